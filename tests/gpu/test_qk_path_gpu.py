"""GPU checks of the fused q/k path kernels (neollm/kernels/qk_path.py).

The op with the kernels against the unfused reference (autograd through ``qk_path_reference``) at
neollm_135m's q and k (64 x 512 tokens, H 8 / Hkv 4, d 64) and a ragged shape (T not a multiple of
the token block, d 16), both momentum starts and none: the value and the gradients to x and to
gamma, alpha, beta (one vector), in fp32 within ``FP32_TOL`` of the fp32 reference, and in fp32 /
bf16 within ``SLACK`` times the reference's own error against fp64 (relative RMS over the whole
tensor). Then neollm_135m's attention at a small width compiled with fullgraph under
NEOLLM_QK_PATH_IMPL=triton: one graph holding the op for q and k, values as eager. The
injected-error checks run on the CPU (tests/qk_path_interpreted.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import GraphRecorder
from gpu_checks import GPU_ONLY, rel_err
from neollm.kernels import qk_path as qp
from neollm.model.rope import rope_cache

pytestmark = GPU_ONLY
SLACK, FLOOR, FP32_TOL = 3.0, 2e-7, 1e-5
PARAM_FLOOR = 2e-6  # the parameter gradients are sums over every row (tests/qk_path_interpreted.py)
EPS = 1e-6


def _problem(shape, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    d = shape[-1]
    scale = torch.exp(torch.randn(*shape[:-1], 1, device="cuda", generator=gen))
    x = (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)
    dy = torch.randn(*shape, device="cuda", generator=gen).to(dtype)
    gamma, alpha = 1 + 0.2 * torch.randn(2, d, device="cuda", generator=gen)
    beta = 0.3 * torch.randn(d, device="cuda", generator=gen)
    return x, dy, gamma, alpha, beta, rope_cache(d, shape[1], 10_000.0, device="cuda")


def _value_and_grads(x, dy, gamma, alpha, beta, rope, momentum, impl, dtype=None):
    leaves = [(t if dtype is None else t.to(dtype)).detach().clone().requires_grad_() for t in (x, gamma, alpha, beta)]
    out = qp.qk_path(*leaves, rope, EPS, *momentum, impl=impl)
    dx, *dparams = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    return out, dx, torch.cat([d.float() if d.dtype != torch.float64 else d for d in dparams])


@pytest.mark.parametrize("momentum", [(0.1, "zero"), (0.1, "repeat"), (0.0, "zero")])
@pytest.mark.parametrize("shape", [(64, 512, 8, 64), (64, 512, 4, 64), (3, 77, 5, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_path_kernels_match_the_reference(dtype, shape, momentum):
    x, dy, g, a, b, rope = _problem(shape, dtype, seed=shape[1])
    want = _value_and_grads(x, dy, g, a, b, rope, momentum, "torch", dtype=torch.float64)
    ref = _value_and_grads(x, dy, g, a, b, rope, momentum, "torch")
    got = _value_and_grads(x, dy, g, a, b, rope, momentum, "triton")
    for name, v, r, e in zip(("out", "dx", "dparams"), got, ref, want):
        assert v.dtype == r.dtype and v.shape == r.shape
        err, ref_err = rel_err(v, e), rel_err(r, e)
        print(f"{dtype} {shape} momentum {momentum} {name}: kernel {err:.2e} reference {ref_err:.2e}")
        floor = PARAM_FLOOR if name == "dparams" else FLOOR
        assert err <= SLACK * ref_err + floor, f"{name}: kernel {err:.2e} vs reference {ref_err:.2e}"
        if dtype == torch.float32:
            assert rel_err(v, r) <= FP32_TOL, f"{name}: kernel vs fp32 reference {rel_err(v, r):.2e}"


def test_attention_compiles_to_one_graph_with_the_kernels(monkeypatch):
    from neollm.model.args import FLAVORS
    from neollm.model.attention import Attention

    monkeypatch.setattr(qp, "QK_PATH_IMPL", "triton")
    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=128, n_heads=8, n_kv_heads=4, head_dim=16,
                               max_seq_len=64, attention_dropout=0.0)
    assert args.seednorm_qk and args.momentum_gamma > 0
    torch.manual_seed(0)
    att = Attention(args).cuda()
    with torch.no_grad():
        for p in att.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(4, 64, 128, device="cuda")
    rope = rope_cache(16, 64, 10_000.0, device="cuda")
    recording = GraphRecorder("inductor")

    torch._dynamo.reset()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = torch.compile(att, backend=recording, fullgraph=True)(x, rope)
        grads = torch.autograd.grad(out.float().square().mean(), list(att.parameters()))
        out_e = att(x, rope)
        grads_e = torch.autograd.grad(out_e.float().square().mean(), list(att.parameters()))
    assert len(recording.graphs) == 1
    targets = recording.targets()
    assert targets.count(torch.ops.neollm.qk_path.default) == 2
    assert rel_err(out, out_e) < 1e-2
    for a, b in zip(grads, grads_e):
        assert rel_err(a, b) < 2e-2
