"""The PolyNorm GLU op (neollm/kernels/polynorm_glu.py): the reference against the model's PolyNorm,
the hand-written backward against autograd, the op's registration and its place in a compiled graph,
the MLP's switch, and the Triton kernels under the CPU interpreter (tests/polynorm_glu_interpreted.py,
in a subprocess)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from conftest import GraphRecorder, fresh_python, run_interpreted

from neollm.errors import ConfigError
from neollm.kernels import polynorm_glu as pg
from neollm.model.args import FLAVORS
from neollm.model.mlp import MLP
from neollm.model.norms import PolyNorm

D64 = torch.float64


def _polynorm(exclusive: bool, dtype=torch.float32) -> PolyNorm:
    """A PolyNorm whose parameters are away from their init (every branch and gradient matters)."""
    pn = PolyNorm(exclusive=exclusive)
    with torch.no_grad():
        pn.weight.copy_(torch.tensor([0.5, -0.3, 0.8]))
        pn.bias.fill_(0.2)
        if exclusive:
            pn.exclusive_logits.copy_(torch.tensor([0.4, -1.1]))
    return pn.to(dtype)


def _params(pn: PolyNorm):
    return pn.weight, pn.bias, pn.exclusive_logits, pn.eps, pn.proj_eps


IN_EPS = 1e-5


def _gains(n: int, dtype=torch.float32, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """SimpleNorm gains for g and u, away from their init of 1."""
    gen = torch.Generator().manual_seed(seed)
    return tuple((1 + 0.3 * torch.randn(n, generator=gen)).to(dtype) for _ in range(2))


def test_reference_with_gains_is_simplenorm_then_polynorm_times_up_bit_for_bit():
    """The gains fold in the gate's and up's SimpleNorm: nn.RMSNorm(g) and nn.RMSNorm(u) first."""
    pn = _polynorm(True).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    g, u = (torch.randn(2, 7, 200, generator=gen) * 3).bfloat16(), torch.randn(2, 7, 200, generator=gen).bfloat16()
    norms = [torch.nn.RMSNorm(200, eps=IN_EPS).bfloat16() for _ in range(2)]
    for norm, gain in zip(norms, _gains(200, torch.bfloat16)):
        norm.weight.data.copy_(gain)
    want = pn(norms[0](g)) * norms[1](u)
    got = pg.polynorm_glu_reference(g, u, *_params(pn), norms[0].weight, norms[1].weight, IN_EPS)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="both SimpleNorm gains"):
        pg.polynorm_glu_op(g, u, *_params(pn), False, norms[0].weight, None, IN_EPS)
    with pytest.raises(ValueError, match="in_eps must be > 0"):
        pg.polynorm_glu_op(g, u, *_params(pn), False, norms[0].weight, norms[1].weight)


@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_models_polynorm_times_up_bit_for_bit(dtype, exclusive):
    pn = _polynorm(exclusive)
    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(2, 7, 200, generator=gen) * 3).to(dtype).requires_grad_()
    u = torch.randn(2, 7, 200, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(2, 7, 200, generator=gen).to(dtype)
    want = pn(g) * u
    got = pg.polynorm_glu_reference(g, u, *_params(pn))
    assert got.dtype == dtype and torch.equal(got, want)
    leaves = [g, u, *(p for p in pn.parameters())]
    for a, b in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gains", [False, True], ids=["no_gains", "gains"])
@pytest.mark.parametrize("exclusive", [False, True])
def test_backward_reference_matches_autograd_fp64(exclusive, gains):
    """The backward the kernel implements, in its PyTorch form, against autograd through the
    reference in fp64: every input's gradient, with one row small enough that R = <x1, x1> is
    clamped to proj_eps and one row of zeros (without gains; with them, g's input norm rescales
    every row, so the tiny row is the input norm's eps case instead)."""
    pn = _polynorm(exclusive, D64)
    gg, gu = _gains(96, D64) if gains else (None, None)
    extra = (gg, gu, IN_EPS) if gains else ()
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(4, 5, 96, generator=gen, dtype=D64) * torch.exp(torch.randn(4, 5, 1, generator=gen, dtype=D64))
    g[0, 0] *= 1e-9
    g[1, 2] = 0
    u, dy = torch.randn(2, 4, 5, 96, generator=gen, dtype=D64)
    out, stats = pg.forward_reference(g, u, *_params(pn), *extra)
    assert stats.shape == (20, pg.N_STATS)
    if not gains:
        assert stats[0, 3] < pn.proj_eps < stats[1, 3]  # clamped, unclamped
    leaves = [g.requires_grad_(), u.requires_grad_(), *pn.parameters()]
    if gains:
        leaves += [gg.requires_grad_(), gu.requires_grad_()]
    ref = pg.polynorm_glu_reference(g, u, *_params(pn), *extra)
    want = torch.autograd.grad(ref, leaves, dy)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=0)
    dg, du, dparams, dgains = pg.backward_reference(g.detach(), u.detach(), *_params(pn)[:3], stats, dy,
                                                    *_params(pn)[3:], *extra)
    got = [dg, du, dparams[:3], dparams[3:4]] + ([dparams[4:6]] if exclusive else [])
    if gains:
        got += [dgains[0], dgains[1]]
    else:
        assert dgains.shape == (0,)
    assert all(w.abs().max() > 1e-3 for w in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gains", [False, True], ids=["no_gains", "gains"])
@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("dtype", [D64, torch.float32, torch.bfloat16])
def test_op_passes_opcheck(dtype, exclusive, gains):
    """torch.library.opcheck on the op (reference implementation): schema, fake tensors, autograd
    registration and AOT dispatch."""
    pn = _polynorm(exclusive)
    g, u = torch.randn(2, 3, 96, dtype=dtype), torch.randn(2, 3, 96, dtype=dtype)
    weight, bias, logits, eps, proj_eps = _params(pn)
    extra = (*(t.requires_grad_() for t in _gains(96)), IN_EPS) if gains else ()
    torch.library.opcheck(pg.polynorm_glu_op, (g.requires_grad_(), u.requires_grad_(), weight, bias, logits,
                                               eps, proj_eps, False, *extra))


def test_op_fake_gives_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        g = torch.empty(4, 3, 96, dtype=torch.bfloat16)
        u = torch.empty(4, 3, 96, dtype=torch.bfloat16)
        w, b, lg = torch.empty(3), torch.empty(1), torch.empty(2)
        out, stats = pg.polynorm_glu_op(g, u, w, b, lg, 1e-6, 1e-6, True)
        dg, du, dp, dgains = pg.polynorm_glu_backward(g, u, w, b, lg, stats, out, 1e-6, 1e-6, True)
        gg = torch.empty(96)
        *_, dgains_in = pg.polynorm_glu_backward(g, u, w, b, lg, stats, out, 1e-6, 1e-6, True, gg, gg, 1e-5)
    assert (out.shape, out.dtype) == ((4, 3, 96), torch.bfloat16)
    assert (stats.shape, stats.dtype) == ((12, pg.N_STATS), torch.float32)
    assert (dg.shape, dg.dtype, du.dtype) == ((4, 3, 96), torch.bfloat16, torch.bfloat16)
    assert (dp.shape, dp.dtype) == ((pg.N_PARAM_GRADS,), torch.float32)
    assert dgains.shape == (0,) and (dgains_in.shape, dgains_in.dtype) == ((2, 96), torch.float32)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_compiles_to_one_graph(backend):
    """A function calling the op (reference path) under fullgraph compile: one graph holding the op,
    and the eager values and gradients."""
    torch._dynamo.reset()
    pn = _polynorm(True)
    recording = GraphRecorder(backend)

    def fn(g, u):
        return pg.polynorm_glu_op(g, u, *_params(pn), False)[0] * 2

    gen = torch.Generator().manual_seed(2)
    g, u = torch.randn(2, 5, 96, generator=gen).requires_grad_(), torch.randn(2, 5, 96, generator=gen).requires_grad_()
    leaves = [g, u, *pn.parameters()]
    out = torch.compile(fn, backend=recording, fullgraph=True)(g, u)
    got = torch.autograd.grad(out.square().sum(), leaves)
    assert len(recording.graphs) == 1
    targets = set(recording.targets())
    assert torch.ops.neollm.polynorm_glu.default in targets
    out_e = fn(g, u)
    want = torch.autograd.grad(out_e.square().sum(), leaves)
    torch.testing.assert_close(out, out_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _mlp(**changes) -> MLP:
    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=32, ffn_hidden_dim=96, **changes)
    assert args.mlp_type == "polynorm"
    torch.manual_seed(0)
    mlp = MLP(args)
    mlp.init_weights(0.02, 0.01)
    return mlp


def test_mlp_with_the_switch_unset_is_the_unfused_module():
    """The default ("auto") keeps a CPU MLP bit for bit the unfused module: down(PolyNorm(gate) * up)."""
    assert pg.POLYNORM_IMPL == os.environ.get("NEOLLM_POLYNORM_IMPL", "auto")
    if "NEOLLM_POLYNORM_IMPL" not in os.environ:
        assert pg.POLYNORM_IMPL == "auto"
    mlp = _mlp(polynorm_exclusive=True)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    m = mlp.fan(x)
    want = mlp.w2(mlp.act(mlp.w1(m)) * mlp.w3(m))
    assert torch.equal(mlp(x), want)


def test_impl_switch_is_validated_and_gated_by_dropout(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = u = torch.randn(2, 8)
    with pytest.raises(ConfigError, match="must be one of"):
        pg.uses_kernel("cuda", g, u)
    with pytest.raises(ConfigError, match="'triton' cannot run: .*not CUDA"):
        pg.uses_kernel("triton", g, u)
    assert not pg.uses_kernel("auto", g, u) and not pg.uses_kernel("torch", g, u)
    assert not pg.uses_kernel("auto", g.double(), u.double())
    with pytest.raises(RuntimeError, match="Triton kernel cannot run here"):  # the op itself refuses too
        pg.polynorm_glu_op(g, u, torch.ones(3), torch.zeros(1), None, 1e-6, 1e-6, True)
    x = torch.randn(2, 6, 32)
    monkeypatch.setattr(pg, "POLYNORM_IMPL", "triton")
    mlp = _mlp(dropout=0.1)
    mlp.train()
    mlp(x)  # dropout active: the unfused path, the switch is not consulted
    mlp.eval()
    with pytest.raises(ConfigError, match="'triton' cannot run"):  # eval: the fused path is asked for
        mlp(x)
    with pytest.raises(ConfigError, match="'triton' cannot run"):  # no dropout: fused while training too
        _mlp()(x)
    monkeypatch.setattr(pg, "POLYNORM_IMPL", "auto")
    mlp.eval()
    mlp(x)  # auto on the CPU: the unfused path


def test_folded_simplenorm_mlp_matches_the_unfolded_one(monkeypatch):
    """NEOLLM_POLYNORM_FOLD_SIMPLENORM=1 hands the gate's and up's SimpleNorm to the op (its reference
    path here, fp64): the MLP's output and every parameter gradient equal the unfolded MLP's; an unknown
    value is refused."""
    monkeypatch.setattr(pg, "uses_kernel", lambda impl, g, u: True)
    monkeypatch.setattr(pg, "_require_kernel", lambda g, u: None)
    monkeypatch.setattr(pg, "forward_kernel", pg.forward_reference)
    monkeypatch.setattr(pg, "backward_kernel", pg.backward_reference)
    mlp = _mlp(polynorm_exclusive=True).double()
    assert mlp.w1.norm is not None and mlp.w3.norm is not None  # neollm_135m: SimpleGPT in the MLP
    with torch.no_grad():
        for norm in (mlp.w1.norm, mlp.w3.norm):
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, dtype=D64))
    x = torch.randn(2, 6, 32, dtype=D64, generator=torch.Generator().manual_seed(6))
    results = {}
    for fold in ("0", "1"):
        monkeypatch.setattr(pg, "FOLD_SIMPLENORM", fold)
        assert bool(mlp._simple_norms()) == (fold == "1")
        out = mlp(x)
        results[fold] = [out, *torch.autograd.grad(out.square().sum(), list(mlp.parameters()))]
    for a, b in zip(results["0"], results["1"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(pg, "FOLD_SIMPLENORM", "1")  # one graph under fullgraph compile, the op inside, same values
    torch._dynamo.reset()
    recording = GraphRecorder("aot_eager")
    out = torch.compile(mlp, backend=recording, fullgraph=True)(x)
    assert len(recording.graphs) == 1 and torch.ops.neollm.polynorm_glu.default in set(recording.targets())
    torch.testing.assert_close(out, results["1"][0], rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(pg, "FOLD_SIMPLENORM", "yes")
    with pytest.raises(ConfigError, match="NEOLLM_POLYNORM_FOLD_SIMPLENORM .* must be 0 or 1"):
        mlp(x)


def test_impl_default_comes_from_the_environment():
    """NEOLLM_POLYNORM_IMPL sets the default for a whole run (read at import, in a fresh process)."""
    code = "from neollm.kernels import polynorm_glu as p; print(p.POLYNORM_IMPL)"
    assert fresh_python(code, NEOLLM_POLYNORM_IMPL="auto").strip() == "auto"


def test_triton_kernels_under_the_interpreter():
    """The kernels on the CPU (TRITON_INTERPRET=1): values and gradients against the reference in
    fp32 and within the reference's own error against fp64 in fp32 / bf16 / fp16, F 96, 128 and
    200, plain and exclusive; the saved statistics; neollm_135m's MLP with the kernels; opcheck with
    the kernels; injected errors fail the same checks."""
    import importlib


    importlib.import_module("triton")  # required: a broken install fails here, not skips

    run_interpreted("polynorm_glu_interpreted.py", timeout=600)
