"""GPU checks of the PolyNorm GLU kernels (neollm/kernels/polynorm_glu.py).

The op with the kernels against the unfused reference (autograd through ``polynorm_glu_reference``)
at neollm_135m's shape (rows of F 1536) and a ragged F, plain and exclusive: the value and the
gradients to g, u and the parameters (one vector), in fp32 within ``FP32_TOL`` of the fp32
reference, and in fp32 / bf16 within ``SLACK`` times the reference's own error against fp64
(relative RMS over the whole tensor). Then neollm_135m's MLP at a small width compiled with
fullgraph under NEOLLM_POLYNORM_IMPL=triton: one graph holding the op, values as eager. The
injected-error checks run on the CPU (tests/polynorm_glu_interpreted.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import GraphRecorder
from gpu_checks import GPU_ONLY, rel_err
from neollm.kernels import polynorm_glu as pg

pytestmark = GPU_ONLY
SLACK, FLOOR, FP32_TOL = 3.0, 2e-7, 1e-5
PARAM_FLOOR = 2e-6  # the parameter gradients are sums over every element (tests/polynorm_glu_interpreted.py)
EPS = PROJ_EPS = 1e-6
IN_EPS = 1e-5  # the gains' (SimpleNorm) eps


def _problem(rows, n, dtype, exclusive, seed=0, gains=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.exp(torch.randn(rows, 1, device="cuda", generator=gen))
    g = (torch.randn(rows, n, device="cuda", generator=gen) * scale).to(dtype)
    u = torch.randn(rows, n, device="cuda", generator=gen).to(dtype)
    dy = torch.randn(rows, n, device="cuda", generator=gen).to(dtype)
    weight = torch.tensor([0.5, -0.3, 0.8], device="cuda")
    bias = torch.tensor([0.2], device="cuda")
    logits = torch.tensor([0.4, -1.1], device="cuda") if exclusive else None
    gg = gu = None
    if gains:  # g and u are raw projection outputs, SimpleNormed by the op
        u = (u.float() * torch.exp(torch.randn(rows, 1, device="cuda", generator=gen))).to(dtype)
        gg, gu = ((1 + 0.3 * torch.randn(n, device="cuda", generator=gen)).to(dtype) for _ in range(2))
    return g, u, dy, weight, bias, logits, gg, gu


def _value_and_grads(g, u, dy, weight, bias, logits, gg, gu, impl, dtype=None):
    leaves = [t if t is None else (t if dtype is None else t.to(dtype)).detach().clone().requires_grad_()
              for t in (g, u, weight, bias, logits, gg, gu)]
    out = pg.polynorm_glu(*leaves[:5], EPS, PROJ_EPS, impl=impl, g_gain=leaves[5], u_gain=leaves[6], in_eps=IN_EPS)
    dg, du, *rest = torch.autograd.grad(out, [t for t in leaves if t is not None], dy.to(out.dtype))
    k = len(rest) - (0 if gg is None else 2)
    vec = lambda ds: torch.cat([d.float() if d.dtype != torch.float64 else d for d in ds]) if ds else torch.zeros(1)
    return out, dg, du, vec(rest[:k]), vec(rest[k:])


@pytest.mark.parametrize("gains", [False, True], ids=["no_gains", "gains"])
@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("rows,n", [(64 * 512, 1536), (1000, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_polynorm_glu_kernels_match_the_reference(dtype, rows, n, exclusive, gains):
    g, u, dy, w, b, lg, gg, gu = _problem(rows, n, dtype, exclusive, seed=n, gains=gains)
    want = _value_and_grads(g, u, dy, w, b, lg, gg, gu, "torch", dtype=torch.float64)
    ref = _value_and_grads(g, u, dy, w, b, lg, gg, gu, "torch")
    got = _value_and_grads(g, u, dy, w, b, lg, gg, gu, "triton")
    for name, x, r, e in zip(("out", "dg", "du", "dparams", "dgains"), got, ref, want):
        if name == "dgains" and not gains:
            continue
        assert x.dtype == r.dtype and x.shape == r.shape
        err, ref_err = rel_err(x, e), rel_err(r, e)
        print(f"{dtype} rows {rows} F {n} exclusive {exclusive} gains {gains} {name}: kernel {err:.2e} "
              f"reference {ref_err:.2e}")
        floor = PARAM_FLOOR if name in ("dparams", "dgains") else FLOOR
        assert err <= SLACK * ref_err + floor, f"{name}: kernel {err:.2e} vs reference {ref_err:.2e}"
        if dtype == torch.float32:
            assert rel_err(x, r) <= FP32_TOL, f"{name}: kernel vs fp32 reference {rel_err(x, r):.2e}"


@pytest.mark.parametrize("fold", ["0", "1"], ids=["simplenorm_apart", "simplenorm_folded"])
def test_polynorm_mlp_compiles_to_one_graph_with_the_kernels(monkeypatch, fold):
    from neollm.model.args import FLAVORS
    from neollm.model.mlp import MLP

    monkeypatch.setattr(pg, "POLYNORM_IMPL", "triton")
    monkeypatch.setattr(pg, "FOLD_SIMPLENORM", fold)
    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=128, ffn_hidden_dim=384)
    assert args.mlp_type == "polynorm" and args.dropout == 0
    torch.manual_seed(0)
    mlp = MLP(args).cuda()
    mlp.init_weights(0.02, 0.01)
    x = torch.randn(4, 64, 128, device="cuda")
    recording = GraphRecorder("inductor")

    torch._dynamo.reset()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = torch.compile(mlp, backend=recording, fullgraph=True)(x)
        grads = torch.autograd.grad(out.float().square().mean(), list(mlp.parameters()))
        out_e = mlp(x)
        grads_e = torch.autograd.grad(out_e.float().square().mean(), list(mlp.parameters()))
    assert len(recording.graphs) == 1
    targets = set(recording.targets())
    assert torch.ops.neollm.polynorm_glu.default in targets
    assert rel_err(out, out_e) < 1e-2
    for a, b in zip(grads, grads_e):
        assert rel_err(a, b) < 2e-2
