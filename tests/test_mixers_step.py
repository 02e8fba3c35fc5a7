"""CPU tests of the recurrent mixers' decode protocol (``new_state`` / ``step``) for G, T, M, R, L and N: in fp64,
a prefill plus single-token steps (and other splits) reproduce the full forward's rows, the state is written in
place (fixed addresses) in the compute dtype, and the references' initial-state path continues a sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from neollm.kernels.linear_attention import chunk_gla_ref, chunk_simple_gla_ref, gla_decode
from neollm.kernels.rwkv6 import chunk_rwkv6_ref, rwkv6_decode
from neollm.model.mixers.gla import GatedLinearAttention
from neollm.model.mixers.mamba2 import Mamba2
from neollm.model.mixers.retnet import MultiScaleRetention
from neollm.model.mixers.rnn import RecurrentMixer
from neollm.model.mixers.rwkv6 import RWKV6

f64 = torch.float64
CODES = ["G", "T", "M", "R", "L", "N"]
D = 24


def _perturb(m: nn.Module, seed: int) -> None:
    """Nonzero values for the parameters fla's init zeroes (token-shift mixes, biases, bonus, LoRA down-projection),
    so every path of the step is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _make(code: str, backend: str = "torch", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if code == "G":
        m = GatedLinearAttention(D, num_heads=2, head_k_dim=8, head_v_dim=12, gate_low_rank_dim=4, backend=backend)
        m.chunk_size = 4  # several chunks in the prefill
    elif code == "T":
        m = MultiScaleRetention(D, num_heads=2, head_k_dim=8, head_v_dim=12, backend=backend)
        m.chunk_size = 4
    elif code == "M":
        m = Mamba2(D, head_dim=8, state_size=6, expand=2, conv_size=4, backend=backend)
        m.chunk_size = 4
    elif code == "R":
        m = RWKV6(D, num_heads=2, head_dim=8, proj_low_rank_dim=4, gate_low_rank_dim=6, backend=backend)
        m.torch_chunk_size = 4
    else:
        m = RecurrentMixer("lstm" if code == "L" else "rnn", D, 16)
    m = m.to(f64).eval()
    if code in "RM":
        _perturb(m, seed + 1)
    return m


def _run_steps(m: nn.Module, x: torch.Tensor, splits: list[int], kernels: str = "auto"):
    B = x.shape[0]
    state = m.new_state(B, x.shape[1], x.dtype, x.device, kernels=kernels)
    ptrs = [t.data_ptr() for t in state.tensors()]
    outs, pos = [], 0
    with torch.no_grad():
        for n in splits:
            outs.append(m.step(x[:, pos:pos + n], state, pos, None))
            pos += n
            assert [t.data_ptr() for t in state.tensors()] == ptrs, "the state must be written in place"
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("splits", [[5] + [1] * 8, [1, 7, 5], [13], [1] * 13])
def test_step_matches_full_forward_fp64(code, splits):
    m = _make(code)
    x = torch.randn(2, 13, D, dtype=f64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = m(x)
    out, state = _run_steps(m, x, splits)
    assert out.shape == full.shape and out.dtype == full.dtype
    torch.testing.assert_close(out, full, atol=1e-9, rtol=0)
    for t in state.tensors():
        assert t.dtype in (f64, torch.int64), t.dtype  # fp64 activations: compute dtype fp64 (counters int64)


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_holds_the_compute_dtype(code, dtype):
    m = _make(code)
    state = m.new_state(3, 32, dtype, "cpu")
    recurrent = {"G": ["state"], "T": ["state"], "M": ["ssm"], "R": ["wkv"], "L": ["h", "c"], "N": ["h"]}[code]
    for name in recurrent:
        t = getattr(state, name)
        assert t.dtype == torch.float32 and t.shape[1 if code in "LN" else 0] == 3  # LSTM/RNN: [1, B, H]
        assert not t.any()
    for t in state.tensors():
        assert not t.any(), "a new state is all zeros"


@pytest.mark.parametrize("code", CODES)
def test_step_in_float32_close_to_forward(code):
    m = _make(code).float()
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(x)
    out, _ = _run_steps(m, x, [4, 1, 1, 1, 1, 1])
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("code", CODES)
def test_kernels_argument_is_checked(code):
    m = _make(code)
    with pytest.raises(ValueError, match="CUDA"):
        m.new_state(1, 8, f64, "cpu", kernels="fla")
    with pytest.raises(ValueError, match="kernels must be one of"):
        m.new_state(1, 8, f64, "cpu", kernels="triton")
    # "torch" and "auto" give the same (torch) step on CPU
    x = torch.randn(1, 6, D, dtype=f64)
    a, _ = _run_steps(m, x, [3, 1, 1, 1], kernels="torch")
    b, _ = _run_steps(m, x, [3, 1, 1, 1], kernels="auto")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_auto_kernels_pick_fla_on_cuda_only():
    """The decode-kernel rule (mixers/common.pick_fla): "auto" takes fla's kernels on CUDA for every fla mixer
    (since tests/gpu/test_mixers_step_gpu.py passed), the torch path elsewhere; "torch" (kernels or backend)
    always the torch path; "fla" off CUDA is refused."""
    from neollm.model.mixers.common import pick_fla

    assert pick_fla("auto", "auto", True, "GLA")
    assert not pick_fla("auto", "auto", False, "GLA")
    assert not pick_fla("auto", "torch", True, "GLA")
    assert not pick_fla("torch", "auto", True, "GLA")
    assert pick_fla("fla", "auto", True, "GLA")
    with pytest.raises(ValueError, match="need a CUDA input"):
        pick_fla("auto", "fla", False, "GLA")


@pytest.mark.parametrize("code", ["G", "T", "M", "R"])
def test_backend_torch_still_selects_the_training_path(code):
    """backend "torch" and "auto" (CPU) run the same chunked reference in training; "fla" on CPU still refuses."""
    x = torch.randn(2, 11, D, dtype=f64, generator=torch.Generator().manual_seed(5))
    a, b = _make(code, backend="torch"), _make(code, backend="auto")
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="CUDA"):
        _make(code, backend="fla")(x)


def test_retnet_position_counter_advances():
    m = _make("T")
    x = torch.randn(1, 5, D, dtype=f64)
    state = m.new_state(1, 8, f64, "cpu")
    with torch.no_grad():
        m.step(x[:, :3], state, 0, None)
        m.step(x[:, 3:4], state, 3, None)
    assert state.position.tolist() == [4]


# ------------------------------------------------------------------------ the references' initial-state path
@pytest.mark.parametrize("per_channel", [True, False])
def test_linear_attention_refs_continue_from_initial_state(per_channel):
    gen = torch.Generator().manual_seed(11)
    B, T, H, K, V = 2, 19, 3, 5, 4
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=f64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=f64)
    g = F.logsigmoid(torch.randn(B, T, H, *((K,) if per_channel else ()), generator=gen, dtype=f64))
    fn = chunk_gla_ref if per_channel else chunk_simple_gla_ref
    o_full, s_full = fn(q, k, v, g, chunk_size=4, output_final_state=True)
    o1, s1 = fn(q[:, :7], k[:, :7], v[:, :7], g[:, :7], chunk_size=4, output_final_state=True)
    o2, s2 = fn(q[:, 7:], k[:, 7:], v[:, 7:], g[:, 7:], chunk_size=4, initial_state=s1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_full, atol=1e-12, rtol=0)
    torch.testing.assert_close(s2, s_full, atol=1e-12, rtol=0)
    # the decode helper: token by token, state in place
    state = torch.zeros(B, H, K, V, dtype=f64)
    outs = [gla_decode(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], state) for t in range(T)]
    torch.testing.assert_close(torch.cat(outs, 1), o_full, atol=1e-12, rtol=0)
    torch.testing.assert_close(state, s_full, atol=1e-12, rtol=0)


def test_rwkv6_decode_helper_matches_chunked():
    gen = torch.Generator().manual_seed(12)
    B, T, H, K = 2, 11, 2, 4
    r, k, v = (torch.randn(B, T, H, K, generator=gen, dtype=f64) for _ in range(3))
    w = -torch.exp(torch.randn(B, T, H, K, generator=gen, dtype=f64))
    u = torch.randn(H, K, generator=gen, dtype=f64)
    o_full, s_full = chunk_rwkv6_ref(r, k, v, w, u, chunk_size=4, output_final_state=True)
    state = torch.zeros(B, H, K, K, dtype=f64)
    o = [rwkv6_decode(r[:, :6], k[:, :6], v[:, :6], w[:, :6], u, state, chunk_size=4)]
    o += [rwkv6_decode(r[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], w[:, t:t + 1], u, state) for t in range(6, T)]
    torch.testing.assert_close(torch.cat(o, 1), o_full, atol=1e-12, rtol=0)
    torch.testing.assert_close(state, s_full, atol=1e-12, rtol=0)


@pytest.mark.parametrize("code", ["G", "T", "M", "R"])
def test_fla_backend_layer_step_refuses_cpu(code):
    """A layer built with backend "fla" cannot step on CPU even with kernels "auto" (as its forward)."""
    m = _make(code, backend="fla")
    state = m.new_state(1, 4, f64, "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        with torch.no_grad():
            m.step(torch.zeros(1, 1, D, dtype=f64), state, 0, None)
