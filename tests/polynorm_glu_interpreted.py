"""Checks of neollm/kernels/polynorm_glu.py's Triton kernels under Triton's CPU interpreter.

Run by tests/test_polynorm_glu.py in a subprocess with TRITON_INTERPRET=1 (the variable must be set
before Triton is imported). Exits non-zero on the first mismatch; prints "ok" at the end.

Tolerance: the op with the kernels against the unfused reference (autograd through
``polynorm_glu_reference``) run on the same inputs, value and the gradients to g, u, weight, bias
and logits. fp32: within ``FP32_TOL`` of the fp32 reference (relative error over the whole tensor).
Every dtype: within ``SLACK`` times the reference's own error against fp64, plus ``FLOOR``. The
injected errors (a mutated copy of the kernels) must fail these checks.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from neollm.kernels import polynorm_glu as pg  # noqa: E402
from kernel_mutants import assert_injected_errors_fail  # noqa: E402  (tests/, this script's folder)

SLACK, FLOOR, FP32_TOL = 3.0, 2e-7, 1e-5
# The parameter gradients (weight, bias, logits: 4-6 numbers, checked as one vector) are sums over
# every element, so one draw's reference error is a noisy yardstick (it was 4e-8 against the
# kernel's 7e-7 for dbias at F 200, fp32): their floor is a sum's fp32 rounding instead.
PARAM_FLOOR = 2e-6
EPS = PROJ_EPS = 1e-6
VERBOSE = os.environ.get("POLYNORM_CHECK_VERBOSE") == "1"  # print every error beside the reference's
NAMES = ("out", "dg", "du", "dparams", "dgains")
IN_EPS = 1e-5  # the SimpleNorm eps of the gains' cases


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def problem(rows: tuple[int, ...], n: int, dtype: torch.dtype, exclusive: bool, seed: int, gains: bool = False):
    """g, u, dy in ``dtype`` (g's rows of different scales), fp32 weight, bias and logits away from
    their init so that every branch and gradient matters; with ``gains``, SimpleNorm gains in
    ``dtype`` (g and u are then raw projection outputs, u's rows of different scales too)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(*rows, 1, generator=gen))
    g = (torch.randn(*rows, n, generator=gen) * scale).to(dtype)
    u = torch.randn(*rows, n, generator=gen).to(dtype)
    dy = torch.randn(*rows, n, generator=gen).to(dtype)
    weight = torch.tensor([0.5, -0.3, 0.8])
    bias = torch.tensor([0.2])
    logits = torch.tensor([0.4, -1.1]) if exclusive else None
    if not gains:
        return g, u, dy, weight, bias, logits, None, None
    u = (u.float() * torch.exp(torch.randn(*rows, 1, generator=gen))).to(dtype)
    gg, gu = ((1 + 0.3 * torch.randn(n, generator=gen)).to(dtype) for _ in range(2))
    return g, u, dy, weight, bias, logits, gg, gu


def value_and_grads(fn, g, u, dy, weight, bias, logits, g_gain=None, u_gain=None, dtype=None):
    """fn's output and its gradients to every input (inputs cast to ``dtype`` when given): out, dg,
    du, the PolyNorm parameters' as one vector, the gains' as one vector (empty without gains)."""
    leaves = [t if t is None else (t if dtype is None else t.to(dtype)).detach().clone().requires_grad_()
              for t in (g, u, weight, bias, logits, g_gain, u_gain)]
    out = fn(*leaves)
    inputs = [t for t in leaves if t is not None]
    dg, du, *rest = torch.autograd.grad(out, inputs, dy.to(out.dtype))
    n_gains = 0 if g_gain is None else 2
    dparams, dgains = rest[:len(rest) - n_gains], rest[len(rest) - n_gains:]
    as_vector = lambda ds: (torch.cat([d.float() if d.dtype != torch.float64 else d for d in ds]) if ds
                            else torch.zeros(1))
    return out, dg, du, as_vector(dparams), as_vector(dgains)


def reference(g, u, w, b, lg, gg=None, gu=None):
    return pg.polynorm_glu_reference(g, u, w, b, lg, EPS, PROJ_EPS, gg, gu, IN_EPS)


def fused(module):
    """The op's forward and autograd around ``module``'s kernel functions (a mutant's, in the checks
    of injected errors): the registered op for the real module."""
    if module is pg:
        return lambda g, u, w, b, lg, gg=None, gu=None: pg.polynorm_glu_op(g, u, w, b, lg, EPS, PROJ_EPS, True,
                                                                           gg, gu, IN_EPS)[0]

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, g, u, w, b, lg, gg, gu):
            out, stats = module.forward_kernel(g, u, w, b, lg, EPS, PROJ_EPS, gg, gu, IN_EPS)
            ctx.save_for_backward(g, u, w, b, lg, stats, gg, gu)
            return out

        @staticmethod
        def backward(ctx, dy):
            g, u, w, b, lg, stats, gg, gu = ctx.saved_tensors
            dg, du, dp, dgains = module.backward_kernel(g, u, w, b, lg, stats, dy, EPS, PROJ_EPS, gg, gu, IN_EPS)
            gains = (None, None) if gg is None else (dgains[0].to(gg.dtype), dgains[1].to(gu.dtype))
            return dg, du, dp[:3], dp[3:4], None if lg is None else dp[4:6], *gains

    return lambda g, u, w, b, lg, gg=None, gu=None: Fused.apply(g, u, w, b, lg, gg, gu)


def check(module, rows, n, dtype, exclusive, seed=0, gains=False) -> None:
    g, u, dy, w, b, lg, gg, gu = problem(rows, n, dtype, exclusive, seed, gains)
    want = value_and_grads(reference, g, u, dy, w, b, lg, gg, gu, dtype=torch.float64)
    ref = value_and_grads(reference, g, u, dy, w, b, lg, gg, gu)
    got = value_and_grads(fused(module), g, u, dy, w, b, lg, gg, gu)
    what = f"rows {rows} F {n} {dtype} {'exclusive' if exclusive else 'plain'}{' gains' if gains else ''}"
    for name, x, r, e in zip(NAMES, got, ref, want):
        if name == "dgains" and not gains:
            continue
        assert x.dtype == r.dtype and x.shape == r.shape, f"{what}: {name} {x.dtype} {x.shape} vs {r.dtype} {r.shape}"
        err, ref_err = rel_err(x, e), rel_err(r, e)
        if VERBOSE:
            print(f"{what}: {name} error {err:.2e}, reference {ref_err:.2e}, vs reference {rel_err(x, r):.2e}")
        floor = PARAM_FLOOR if name in ("dparams", "dgains") else FLOOR
        assert err <= SLACK * ref_err + floor, f"{what}: {name} error {err:.2e}, reference {ref_err:.2e}"
        if dtype == torch.float32:
            assert rel_err(x, r) <= FP32_TOL, f"{what}: {name} differs from the reference by {rel_err(x, r):.2e}"


def check_stats() -> None:
    """The saved row statistics equal the reference's (fp32)."""
    for exclusive, gains in ((False, False), (True, False), (True, True)):
        g, u, _, w, b, lg, gg, gu = problem((7,), 200, torch.float32, exclusive, seed=3, gains=gains)
        _, stats = pg.forward_kernel(g, u, w, b, lg, EPS, PROJ_EPS, gg, gu, IN_EPS)
        _, want = pg.forward_reference(g, u, w, b, lg, EPS, PROJ_EPS, gg, gu, IN_EPS)
        torch.testing.assert_close(stats, want, rtol=1e-5, atol=1e-6)


def check_mlp() -> None:
    """neollm_135m's MLP (FFN FAN, multipliers, SimpleNorm, exclusive PolyNorm) at a small width:
    the output, and every parameter gradient as one vector, with NEOLLM_POLYNORM_IMPL triton in fp32
    against torch in fp64, beside torch in fp32 (whose own error here is ~5e-4: the parameter
    gradients of this graph cancel, so the fp32 tolerance of ``check`` does not apply)."""
    from neollm.model.args import FLAVORS
    from neollm.model.mlp import MLP

    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=64, ffn_hidden_dim=200, polynorm_exclusive=True)
    torch.manual_seed(0)
    mlp = MLP(args)
    mlp.init_weights(0.02, 0.01)
    with torch.no_grad():
        mlp.act.exclusive_logits.copy_(torch.tensor([0.4, -1.1]))
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))

    def run(impl, dtype, fold="0"):
        pg.POLYNORM_IMPL, pg.FOLD_SIMPLENORM = impl, fold
        module = mlp.to(dtype)
        module.zero_grad()
        out = module(x.to(dtype))
        out.square().mean().backward()
        return out.detach().double(), torch.cat([p.grad.flatten().double() for p in module.parameters()])

    original = pg.POLYNORM_IMPL, pg.FOLD_SIMPLENORM
    try:
        want, ref = run("torch", torch.float64), run("torch", torch.float32)
        runs = {fold: run("triton", torch.float32, fold) for fold in ("0", "1")}  # SimpleNorms apart / folded in
    finally:
        pg.POLYNORM_IMPL, pg.FOLD_SIMPLENORM = original
    for fold, got in runs.items():
        for name, x_, r, w in zip(("output", "gradients"), got, ref, want):
            err, ref_err = rel_err(x_, w), rel_err(r, w)
            if VERBOSE:
                print(f"MLP fold {fold} {name}: error {err:.2e}, reference {ref_err:.2e}")
            assert err <= SLACK * ref_err + FLOOR, f"MLP fold {fold} {name}: error {err:.2e}, reference {ref_err:.2e}"


def check_opcheck() -> None:
    """torch.library's checks of the op with the kernels (schema, fake tensor, autograd registration)."""
    for exclusive, gains in ((False, False), (True, False), (True, True)):
        g, u, _, w, b, lg, gg, gu = problem((2, 3), 96, torch.bfloat16, exclusive, seed=4, gains=gains)
        args = [t.requires_grad_() for t in (g, u, w, b)] + [lg if lg is None else lg.requires_grad_()]
        extra = (gg.requires_grad_(), gu.requires_grad_(), IN_EPS) if gains else ()
        torch.library.opcheck(pg.polynorm_glu_op, (*args, EPS, PROJ_EPS, True, *extra),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


INJECTED = {
    "saved r2 off by 1e-4 (relative)": [("tl.store(s_base + 1, r2)", "tl.store(s_base + 1, r2 * 1.0001)")],
    "masked lanes of g read as 1": [("x = tl.load(g_ptr + row * n_cols + cols, mask=ok, other=0.0)",
                                     "x = tl.load(g_ptr + row * n_cols + cols, mask=ok, other=1.0)")],
    "forward input norm of u without its gain": [
        ("u = u * ru * tl.load(gu_ptr + cols, mask=ok, other=0.0).to(tl.float32)", "u = u * ru")],
    "u's input norm backward without its projection term": [("du = _rms_bwd(du * gam_u, u_hat, ru, n_cols)",
                                                             "du = du * gam_u * ru")],
    "g's input norm backward without its gain": [("dg = _rms_bwd(dg * gam_g, g_hat, rg, n_cols)",
                                                  "dg = _rms_bwd(dg, g_hat, rg, n_cols)")],
    "gain gradients summed over one row per program": [("acc_u += du * u_hat", "acc_u = du * u_hat")],
    "RMS backward without its projection term": [("return r * (dy - y * (tl.sum(dy * y, axis=0) / n_cols))",
                                                  "return r * dy")],
    "projection coefficient's gradient to x2 dropped": [("+ dc2 * x2 / ref", "")],
    "sigmoid derivative missing": [("-c3 * t3 * a3 * (1.0 - a3)", "-c3 * t3")],
    "projection's gradient to x3 dropped": [("dx3 = dv3 + dc3 * x1 / ref", "dx3 = dv3")],
    # (not injected: dropping the projection term of g's input norm backward: PolyNorm is scale-invariant
    # in its input, so dg is orthogonal to g = gain * g_hat already and the term is 0 up to eps)
    # (not injected: dropping the gradient through R = <x1, x1>: x1 is RMS-normalised, so R is n up
    # to eps, and the term lies along x1, which x1's RMS backward projects out: 4e-7 relative)
}


def check_injected_errors_fail() -> None:
    assert_injected_errors_fail(pg, INJECTED, lambda module: check(module, (3, 4), 96, torch.float32, exclusive=True,
                                                                   gains=True))


if __name__ == "__main__":
    check(pg, (3, 4), 96, torch.float32, exclusive=True, gains=True)  # the mutants' case, unmutated
    for rows, n, dtype, exclusive in [
        ((3, 4), 96, torch.float32, False),
        ((2, 5), 200, torch.float32, False),
        ((2, 5), 200, torch.float32, True),
        ((16,), 128, torch.float32, True),   # F a power of two: no masked lanes
        ((3, 4), 96, torch.bfloat16, False),
        ((3, 4), 96, torch.bfloat16, True),
        ((2, 5), 200, torch.bfloat16, True),
        ((2, 5), 200, torch.float16, False),
    ]:
        check(pg, rows, n, dtype, exclusive, seed=n)
    # the gate's and up's SimpleNorm folded in; 37 / 70 rows: more than one program, the last one partial
    for rows, n, dtype, exclusive in [
        ((37,), 96, torch.float32, False),
        ((2, 35), 200, torch.float32, True),
        ((37,), 96, torch.bfloat16, True),
        ((2, 5), 200, torch.float16, False),
    ]:
        check(pg, rows, n, dtype, exclusive, seed=n + 1, gains=True)
    check_stats()
    check_mlp()
    check_opcheck()
    check_injected_errors_fail()
    print("ok")
    sys.exit(0)
