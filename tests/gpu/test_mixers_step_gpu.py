"""GPU checks of the recurrent mixers' decode steps, G, T, M, R, L and N (tests/test_mixers_step.py checks the
torch path in fp64 on CPU). Passed on an H200 on 2026-12-05, since when kernels "auto" takes fla on CUDA (common.pick_fla).

* fla kernels (state kernels "fla", and "auto" on CUDA): a prefill of 37
  tokens (chunk_* with the state as initial_state; 37 is not a multiple of fla's chunk of 64) then 8
  single-token steps (fused_recurrent_*) reproduce the torch forward's rows (relative RMS error,
  tests/gpu/test_mixers_gpu.py's tolerances: fp32 5e-3, bf16 2.5e-2).
* CUDA graphs: after a prefill, the T = 1 step (both kernel choices) is captured once and replayed over 4 tokens;
  the replays equal eager steps from the same state, the state's addresses never change, and an eager T = 1 step
  runs under torch.cuda.set_sync_debug_mode("error") (no host sync).
"""

from __future__ import annotations

import pytest
import torch
from gpu_checks import GPU_ONLY, rel_err

pytestmark = GPU_ONLY

D = 256
TOL = {torch.float32: 5e-3, torch.bfloat16: 2.5e-2}


def _build(code: str, dtype: torch.dtype) -> torch.nn.Module:
    from neollm.model.mixers.gla import GatedLinearAttention
    from neollm.model.mixers.mamba2 import Mamba2
    from neollm.model.mixers.retnet import MultiScaleRetention
    from neollm.model.mixers.rnn import RecurrentMixer
    from neollm.model.mixers.rwkv6 import RWKV6

    torch.manual_seed(0)
    if code == "G":
        m = GatedLinearAttention(D, 4, 32, 64, gate_low_rank_dim=16)
    elif code == "T":
        m = MultiScaleRetention(D, 4, 32, 64)
    elif code == "M":
        m = Mamba2(D, head_dim=32, state_size=64, expand=2, conv_size=4)
    elif code == "R":
        m = RWKV6(D, 4, 32, proj_low_rank_dim=16, gate_low_rank_dim=32)
    else:
        m = RecurrentMixer("lstm" if code == "L" else "rnn", D, 128)
    m = m.cuda().to(dtype).eval()
    if code in "GTMR":
        m.init_weights(init_std=0.05, out_std=0.05)
    if code == "R":  # fla's init zeroes the token-shift mixes and the bonus: give them values
        with torch.no_grad():
            for p in (m.x_proj[0].mu, m.x_bias, m.bonus, m.w_proj.linear.lora[0].weight):
                p.normal_(0.0, 0.2)
    return m


def _forward_torch(m, x):
    """The training forward on the torch path (the reference)."""
    backend = getattr(m, "backend", None)
    if backend is not None:
        m.backend = "torch"
    try:
        with torch.no_grad():
            return m(x)
    finally:
        if backend is not None:
            m.backend = backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("code", ["G", "T", "M", "R"])
def test_fla_step_matches_torch_forward(code, dtype):
    import fla  # noqa: F401  (required: a broken install fails, not skips)

    m = _build(code, dtype)
    x = torch.randn(2, 45, D, device="cuda", dtype=dtype)
    ref = _forward_torch(m, x)
    for kernels in ("fla", "torch"):
        state = m.new_state(2, 45, dtype, "cuda", kernels=kernels)
        with torch.no_grad():
            out = [m.step(x[:, :37], state, 0, None)]
            out += [m.step(x[:, t:t + 1], state, t, None) for t in range(37, 45)]
        out = torch.cat(out, 1)
        err = rel_err(out, ref)
        assert err < TOL[dtype], (kernels, err)


def _snapshot(state):
    return [t.clone() for t in state.tensors()]


def _restore(state, snap):
    for t, s in zip(state.tensors(), snap):
        t.copy_(s)


@pytest.mark.parametrize("kernels", ["fla", "torch"])
@pytest.mark.parametrize("code", ["G", "T", "M", "R", "L", "N"])
def test_single_token_step_replays_from_a_cuda_graph(code, kernels):
    dtype = torch.bfloat16
    m = _build(code, dtype)
    B, P, N = 2, 5, 4
    x = torch.randn(B, P + N, D, device="cuda", dtype=dtype)
    state = m.new_state(B, P + N, dtype, "cuda", kernels=kernels)
    ptrs = [t.data_ptr() for t in state.tensors()]
    with torch.no_grad():
        m.step(x[:, :P], state, 0, None)
        after_prefill = _snapshot(state)
        eager = [m.step(x[:, t:t + 1], state, t, None) for t in range(P, P + N)]
        eager_final = _snapshot(state)

        _restore(state, after_prefill)
        x_buf = x[:, P:P + 1].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles, cuDNN plans) outside the capture
            for _ in range(2):
                m.step(x_buf, state, P, None)
        torch.cuda.current_stream().wait_stream(side)
        _restore(state, after_prefill)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            m.step(x_buf, state, P, None)  # no host sync in a T = 1 step
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _restore(state, after_prefill)

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_buf = m.step(x_buf, state, P, None)
        _restore(state, after_prefill)
        replayed = []
        for t in range(P, P + N):
            x_buf.copy_(x[:, t:t + 1])
            graph.replay()
            replayed.append(y_buf.clone())
    torch.cuda.synchronize()
    assert [t.data_ptr() for t in state.tensors()] == ptrs
    for a, b in zip(replayed, eager):
        assert rel_err(a, b) < 1e-3, rel_err(a, b)
    for a, b in zip(state.tensors(), eager_final):
        assert rel_err(a.double(), b.double()) < 1e-3
