"""GPU checks of the attention epilogue kernels (neollm/kernels/attention_epilogue.py).

The op with the kernels against the unfused reference (autograd through ``epilogue_reference``) at
neollm_135m's shape (64 * 512 tokens, 8 heads over 4 KV heads, d 64, 4 directions, elementwise gate)
and a small headwise one: the value and the gradients to y, v, the directions, the router and gate
logits, in fp32 within ``FP32_TOL`` of the fp32 reference, and in fp32 / bf16 within ``SLACK`` times
the reference's own error against fp64 (relative RMS over the whole tensor). Then neollm_135m's
attention at a small width compiled with fullgraph under NEOLLM_EPILOGUE_IMPL=triton: one graph
holding the op, values as eager. The injected-error checks run on the CPU
(tests/attention_epilogue_interpreted.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import GraphRecorder
from gpu_checks import GPU_ONLY, rel_err
from neollm.kernels import attention_epilogue as ep

pytestmark = GPU_ONLY
SLACK, FLOOR, FP32_TOL = 3.0, 2e-7, 1e-5
EPS = 1e-6
NAMES = ("out", "dy", "dv", "du", "dz", "dg")


def _problem(tokens, h, hkv, d, k, gate, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    y = randn(1, tokens, h, d).to(dtype)
    v = (randn(1, tokens, hkv, d) * torch.exp(randn(1, tokens, hkv, 1))).to(dtype)
    u = F.normalize(randn(h, k, d), dim=-1)
    z = randn(1, tokens, h, k) * 2
    g = (randn(1, tokens, h, d) if gate == "elementwise" else randn(1, tokens, h)).to(dtype)
    return (y, v, u, z, g), randn(1, tokens, h, d).to(dtype)


def _value_and_grads(inputs, d_out, use_kernel, dtype=None):
    leaves = [(x if dtype is None else x.to(dtype)).detach().clone().requires_grad_() for x in inputs]
    if use_kernel:
        out = ep.epilogue_op(*leaves, EPS, True)
    else:
        out = ep.epilogue_reference(*leaves, EPS)
    return (out, *torch.autograd.grad(out, leaves, d_out.to(out.dtype)))


@pytest.mark.parametrize("tokens,h,hkv,d,k,gate", [(64 * 512, 8, 4, 64, 4, "elementwise"),
                                                  (1000, 6, 2, 48, 3, "headwise")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_epilogue_kernels_match_the_reference(dtype, tokens, h, hkv, d, k, gate):
    inputs, d_out = _problem(tokens, h, hkv, d, k, gate, dtype, seed=d)
    want = _value_and_grads(inputs, d_out, False, dtype=torch.float64)
    ref = _value_and_grads(inputs, d_out, False)
    got = _value_and_grads(inputs, d_out, True)
    for name, x, r, e in zip(NAMES, got, ref, want):
        assert x.dtype == r.dtype and x.shape == r.shape
        err, ref_err = rel_err(x, e), rel_err(r, e)
        print(f"{dtype} tokens {tokens} h {h}/{hkv} d {d} {gate} {name}: kernel {err:.2e} reference {ref_err:.2e}")
        assert err <= SLACK * ref_err + FLOOR, f"{name}: kernel {err:.2e} vs reference {ref_err:.2e}"
        if dtype == torch.float32:
            assert rel_err(x, r) <= FP32_TOL, f"{name}: kernel vs fp32 reference {rel_err(x, r):.2e}"


def test_attention_compiles_to_one_graph_with_the_kernels(monkeypatch):
    from neollm.model.args import FLAVORS
    from neollm.model.attention import Attention
    from neollm.model.rope import rope_cache

    monkeypatch.setattr(ep, "EPILOGUE_IMPL", "triton")
    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=128, n_heads=4, n_kv_heads=2, head_dim=32)
    torch.manual_seed(0)
    attn = Attention(args).cuda()
    x = torch.randn(4, 64, 128, device="cuda")
    rope = rope_cache(32, 64, 1e4, device="cuda")
    recording = GraphRecorder("inductor")

    torch._dynamo.reset()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = torch.compile(attn, backend=recording, fullgraph=True)(x, rope)
        grads = torch.autograd.grad(out.float().square().mean(), list(attn.parameters()))
        out_e = attn(x, rope)
        grads_e = torch.autograd.grad(out_e.float().square().mean(), list(attn.parameters()))
    assert len(recording.graphs) == 1
    targets = set(recording.targets())
    assert torch.ops.neollm.attention_epilogue.default in targets
    assert rel_err(out, out_e) < 1e-2
    for a, b in zip(grads, grads_e):
        assert rel_err(a, b) < 2e-2
