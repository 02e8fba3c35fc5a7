"""Checks of neollm/kernels/qk_path.py's Triton kernels under Triton's CPU interpreter.

Run by tests/test_qk_path.py in a subprocess with TRITON_INTERPRET=1 (the variable must be set before
Triton is imported). Exits non-zero on the first mismatch; prints "ok" at the end.

Tolerance: the op with the kernels against the unfused reference (autograd through
``qk_path_reference``) run on the same inputs, value and the gradients to x and to gamma, alpha,
beta (one vector). fp32: within ``FP32_TOL`` of the fp32 reference (relative error over the whole
tensor). Every dtype: within ``SLACK`` times the reference's own error against fp64, plus ``FLOOR``.
The injected errors (a mutated copy of the kernels) must fail these checks.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from neollm.kernels import qk_path as qp  # noqa: E402
from neollm.model.rope import rope_cache  # noqa: E402
from conftest import GraphRecorder  # noqa: E402  (tests/, this script's folder)
from kernel_mutants import assert_injected_errors_fail  # noqa: E402

SLACK, FLOOR, FP32_TOL = 3.0, 2e-7, 1e-5
# The parameter gradients are sums over every row (tests/polynorm_glu_interpreted.py): their floor
# is a sum's fp32 rounding, not one draw's reference error.
PARAM_FLOOR = 2e-6
EPS = 1e-6
VERBOSE = os.environ.get("QK_PATH_CHECK_VERBOSE") == "1"  # print every error beside the reference's
NAMES = ("out", "dx", "dparams")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def problem(shape: tuple[int, int, int, int], dtype: torch.dtype, seed: int):
    """x (rows of different scales) and dy in ``dtype``; fp32 gamma, alpha, beta away from their init
    (beta = 0 would hide the tanh term); the fp32 RoPE table."""
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(*shape, generator=gen) * torch.exp(torch.randn(*shape[:-1], 1, generator=gen))).to(dtype)
    dy = torch.randn(*shape, generator=gen).to(dtype)
    gamma, alpha = 1 + 0.2 * torch.randn(2, d, generator=gen)
    beta = 0.3 * torch.randn(d, generator=gen)
    return x, dy, gamma, alpha, beta, rope_cache(d, shape[1] + 3, 10_000.0)


def value_and_grads(fn, x, dy, gamma, alpha, beta, dtype=None):
    """fn's output and its gradients to x and (one vector) gamma, alpha, beta (inputs cast to ``dtype``)."""
    leaves = [(t if dtype is None else t.to(dtype)).detach().clone().requires_grad_() for t in (x, gamma, alpha, beta)]
    out = fn(*leaves)
    dx, *dparams = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    return out, dx, torch.cat([d.float() if d.dtype != torch.float64 else d for d in dparams])


def reference(rope, momentum_gamma, momentum_first):
    return lambda x, g, a, b: qp.qk_path_reference(x, g, a, b, rope, EPS, momentum_gamma, momentum_first)


def fused(module, rope, momentum_gamma, momentum_first):
    """The op's forward and autograd around ``module``'s kernel functions (a mutant's, in the checks of
    injected errors): the registered op for the real module."""
    if module is qp:
        return lambda x, g, a, b: qp.qk_path_op(x, g, a, b, rope, EPS, momentum_gamma, momentum_first, True)[0]

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, g, a, b):
            out, stats = module.forward_kernel(x, g, a, b, rope, EPS, momentum_gamma, momentum_first)
            ctx.save_for_backward(x, g, a, b, stats)
            return out

        @staticmethod
        def backward(ctx, dy):
            x, g, a, b, stats = ctx.saved_tensors
            dx, dp = module.backward_kernel(x, g, a, b, rope, stats, dy, momentum_gamma, momentum_first)
            return dx, dp[0], dp[1], dp[2]

    return Fused.apply


def check(module, shape, dtype, momentum_gamma, momentum_first, seed=0) -> None:
    x, dy, g, a, b, rope = problem(shape, dtype, seed)
    want = value_and_grads(reference(rope, momentum_gamma, momentum_first), x, dy, g, a, b, dtype=torch.float64)
    ref = value_and_grads(reference(rope, momentum_gamma, momentum_first), x, dy, g, a, b)
    got = value_and_grads(fused(module, rope, momentum_gamma, momentum_first), x, dy, g, a, b)
    what = f"shape {shape} {dtype} momentum {momentum_gamma} {momentum_first}"
    for name, v, r, e in zip(NAMES, got, ref, want):
        assert v.dtype == r.dtype and v.shape == r.shape, f"{what}: {name} {v.dtype} {v.shape} vs {r.dtype} {r.shape}"
        err, ref_err = rel_err(v, e), rel_err(r, e)
        if VERBOSE:
            print(f"{what}: {name} error {err:.2e}, reference {ref_err:.2e}, vs reference {rel_err(v, r):.2e}")
        floor = PARAM_FLOOR if name == "dparams" else FLOOR
        assert err <= SLACK * ref_err + floor, f"{what}: {name} error {err:.2e}, reference {ref_err:.2e}"
        if dtype == torch.float32:
            assert rel_err(v, r) <= FP32_TOL, f"{what}: {name} differs from the reference by {rel_err(v, r):.2e}"


def check_stats() -> None:
    """The saved row statistics (r, s) equal the reference's (fp32)."""
    x, _, g, a, b, rope = problem((2, 37, 3, 16), torch.float32, seed=3)
    _, stats = qp.forward_kernel(x, g, a, b, rope, EPS, 0.1, "zero")
    _, want = qp.forward_reference(x, g, a, b, rope, EPS, 0.1, "zero")
    torch.testing.assert_close(stats, want, rtol=1e-5, atol=1e-6)


def check_attention() -> None:
    """neollm_135m's attention (H 8 / Hkv 4, d 16, T 37) with NEOLLM_QK_PATH_IMPL triton in fp32 against
    torch in fp64, beside torch in fp32: the output, and every parameter gradient as one vector; then
    compiled with fullgraph (aot_eager): one graph holding the op for q and for k, values as eager."""
    from neollm.model.args import FLAVORS
    from neollm.model.attention import Attention

    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=64, n_heads=8, n_kv_heads=4, head_dim=16,
                               max_seq_len=64, attention_dropout=0.0)
    torch.manual_seed(0)
    att = Attention(args)
    with torch.no_grad():
        for p in att.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1))
    rope = rope_cache(16, 64, 10_000.0)

    def run(impl, dtype, module=None):
        qp.QK_PATH_IMPL = impl
        m = att.to(dtype)
        out = (m if module is None else module)(x.to(dtype), rope.to(dtype))
        grads = torch.autograd.grad(out.square().mean(), list(m.parameters()))
        return out.detach().double(), torch.cat([g.flatten().double() for g in grads])

    recording = GraphRecorder("aot_eager")

    original = qp.QK_PATH_IMPL
    try:
        want, ref, got = run("torch", torch.float64), run("torch", torch.float32), run("triton", torch.float32)
        compiled = run("triton", torch.float32, torch.compile(att, backend=recording, fullgraph=True))
    finally:
        qp.QK_PATH_IMPL = original
    for name, v, r, w in zip(("output", "gradients"), got, ref, want):
        err, ref_err = rel_err(v, w), rel_err(r, w)
        if VERBOSE:
            print(f"attention {name}: error {err:.2e}, reference {ref_err:.2e}")
        assert err <= SLACK * ref_err + FLOOR, f"attention {name}: error {err:.2e}, reference {ref_err:.2e}"
    assert len(recording.graphs) == 1
    targets = recording.targets()
    assert targets.count(torch.ops.neollm.qk_path.default) == 2
    for name, c, v in zip(("output", "gradients"), compiled, got):
        assert rel_err(c, v) <= 1e-6, f"compiled attention {name} differs from eager by {rel_err(c, v):.2e}"


def check_opcheck() -> None:
    """torch.library's checks of the op with the kernels (schema, fake tensor, autograd registration)."""
    for momentum_gamma, momentum_first in ((0.1, "repeat"), (0.0, "zero")):
        x, _, g, a, b, rope = problem((2, 5, 3, 16), torch.bfloat16, seed=4)
        args = [t.requires_grad_() for t in (x, g, a, b)]
        torch.library.opcheck(qp.qk_path_op, (*args, rope, EPS, momentum_gamma, momentum_first, True),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


INJECTED = {
    "momentum's sign flipped": [("p1 = p1 + mg * (p1 - q1)", "p1 = p1 - mg * (p1 - q1)")],
    "repeat start missing (forward)": [("q1 = tl.where(first, p1, q1)", "q1 = q1")],
    "repeat start missing (backward)": [("f1 = tl.where(first, f1 - mg * dp1, f1)", "f1 = f1")],
    "momentum's transpose without its (1 + mg)": [("f1 = (1.0 + mg) * dp1 - mg * e1", "f1 = dp1 - mg * e1")],
    "RoPE rotates the wrong way": [("return n1 * cos - n2 * sin, n2 * cos + n1 * sin",
                                    "return n1 * cos + n2 * sin, n2 * cos - n1 * sin")],
    "RoPE's transpose rotates the wrong way": [("dn1 = dp1 * cos + dp2 * sin", "dn1 = dp1 * cos - dp2 * sin"),
                                               ("dn2 = dp2 * cos - dp1 * sin", "dn2 = dp2 * cos + dp1 * sin")],
    "beta's term missing from dx": [("dx1 = r * (dxh1 - xh1 * proj) + dz * b1[None, :]",
                                     "dx1 = r * (dxh1 - xh1 * proj)")],
    "tanh derivative missing": [("* (1.0 - s * s)", "")],
    "RMS backward without its projection term": [("dx2 = r * (dxh2 - xh2 * proj)", "dx2 = r * dxh2")],
    "saved tanh off by 1e-4 (relative)": [("tl.store(stats_ptr + rows * 2 + 1, s, mask=ok_t)",
                                           "tl.store(stats_ptr + rows * 2 + 1, s * 1.0001, mask=ok_t)")],
    "dalpha without the tanh factor": [("tl.sum(s * u2, axis=0)", "tl.sum(u2, axis=0)")],
}


def check_injected_errors_fail() -> None:
    def checks(module):
        for momentum_first in ("zero", "repeat"):
            check(module, (2, 37, 3, 16), torch.float32, 0.1, momentum_first)

    assert_injected_errors_fail(qp, INJECTED, checks)


if __name__ == "__main__":
    for momentum_first in ("zero", "repeat"):
        check(qp, (2, 37, 3, 16), torch.float32, 0.1, momentum_first)  # the mutants' cases, unmutated
    for shape, dtype, momentum_gamma, momentum_first in [
        ((2, 37, 8, 64), torch.float32, 0.1, "zero"),      # q of neollm_135m's heads, two token blocks
        ((2, 37, 4, 64), torch.float32, 0.1, "repeat"),    # k (Hkv 4)
        ((2, 37, 4, 64), torch.float32, 0.0, "zero"),      # no momentum
        ((1, 5, 2, 16), torch.float32, 0.1, "repeat"),     # one short block
        ((3, 1, 2, 16), torch.float32, 0.1, "zero"),       # T = 1: the first token is the last
        ((2, 37, 8, 64), torch.bfloat16, 0.1, "zero"),
        ((2, 37, 4, 64), torch.bfloat16, 0.1, "repeat"),
        ((2, 20, 4, 16), torch.bfloat16, 0.0, "zero"),
        ((2, 37, 4, 64), torch.float16, 0.1, "zero"),
    ]:
        check(qp, shape, dtype, momentum_gamma, momentum_first, seed=shape[1] + shape[3])
    check_stats()
    check_attention()
    check_opcheck()
    check_injected_errors_fail()
    print("ok")
    sys.exit(0)
