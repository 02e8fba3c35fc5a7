"""Checks of neollm/kernels/attention_epilogue.py's Triton kernels under Triton's CPU interpreter.

Run by tests/test_attention_epilogue.py in a subprocess with TRITON_INTERPRET=1 (the variable must be
set before Triton is imported). Exits non-zero on the first mismatch; prints "ok" at the end.

Tolerance, as tests/polynorm_glu_interpreted.py: the op with the kernels against the unfused
reference (autograd through ``epilogue_reference``) on the same inputs, the value and the gradients
to y, v, the unit directions, the router logits and the gate logits. fp32: within ``FP32_TOL`` of
the fp32 reference. Every dtype: within ``SLACK`` times the reference's own error against fp64, plus
``FLOOR``. The injected errors (a mutated copy of the kernels) must fail these checks.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from neollm.kernels import attention_epilogue as ep  # noqa: E402
from kernel_mutants import assert_injected_errors_fail  # noqa: E402  (tests/, this script's folder)

SLACK, FLOOR, FP32_TOL = 3.0, 2e-7, 1e-5
EPS = 1e-6
VERBOSE = os.environ.get("EPILOGUE_CHECK_VERBOSE") == "1"
NAMES = ("out", "dy", "dv", "du", "dz", "dg")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def problem(b: int, t: int, h: int, hkv: int, d: int, k: int, dtype: torch.dtype, gate: str, seed: int):
    """y, v, gate logits in ``dtype``; unit directions and router logits in fp32 (as the model passes
    them: the bias add promotes the router's logits); every step on. ``gate``: elementwise|headwise|none."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(b, t, h, d, generator=gen).to(dtype)
    v = (torch.randn(b, t, hkv, d, generator=gen) * torch.exp(torch.randn(b, t, hkv, 1, generator=gen))).to(dtype)
    u = F.normalize(torch.randn(h, k, d, generator=gen), dim=-1)
    z = torch.randn(b, t, h, k, generator=gen) * 2
    g = {"elementwise": torch.randn(b, t, h, d, generator=gen).to(dtype),
         "headwise": torch.randn(b, t, h, generator=gen).to(dtype), "none": None}[gate]
    dout = torch.randn(b, t, h, d, generator=gen).to(dtype)
    return (y, v, u, z, g), dout


def value_and_grads(fn, inputs, dout, dtype=None):
    """fn's output and its gradients to every given input (inputs cast to ``dtype`` when given)."""
    leaves = [None if x is None else (x if dtype is None else x.to(dtype)).detach().clone().requires_grad_()
              for x in inputs]
    out = fn(*leaves)
    given = [x for x in leaves if x is not None]
    return (out, *torch.autograd.grad(out, given, dout.to(out.dtype)))


def reference(y, v, u, z, g):
    return ep.epilogue_reference(y, v, u, z, g, EPS)


def fused(module):
    """The op around ``module``'s kernel functions (a mutant's, in the checks of injected errors): the
    registered op for the real module."""
    if module is ep:
        return lambda y, v, u, z, g: ep.epilogue_op(y, v, u, z, g, EPS, True)

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y, v, u, z, g):
            ctx.save_for_backward(y, v, u, z, g)
            return module.forward_kernel(y, v, u, z, g, EPS)

        @staticmethod
        def backward(ctx, dout):
            return module.backward_kernel(*ctx.saved_tensors, dout, EPS)

    return Fused.apply


def check(module, shape, dtype, gate="elementwise", steps=("xsa", "routing"), seed=0) -> None:
    inputs, dout = problem(*shape, dtype, gate, seed)
    y, v, u, z, g = inputs
    inputs = (y, v if "xsa" in steps else None, u if "routing" in steps else None,
              z if "routing" in steps else None, g)
    want = value_and_grads(reference, inputs, dout, dtype=torch.float64)
    ref = value_and_grads(reference, inputs, dout)
    got = value_and_grads(fused(module), inputs, dout)
    names = [n for n, x in zip(NAMES, (y, *inputs)) if x is not None]
    what = f"shape {shape} {dtype} gate {gate} steps {steps}"
    for name, x, r, e in zip(names, got, ref, want):
        assert x.dtype == r.dtype and x.shape == r.shape, f"{what}: {name} {x.dtype} {x.shape} vs {r.dtype} {r.shape}"
        err, ref_err = rel_err(x, e), rel_err(r, e)
        if VERBOSE:
            print(f"{what}: {name} error {err:.2e}, reference {ref_err:.2e}, vs reference {rel_err(x, r):.2e}")
        assert err <= SLACK * ref_err + FLOOR, f"{what}: {name} error {err:.2e}, reference {ref_err:.2e}"
        if dtype == torch.float32:
            assert rel_err(x, r) <= FP32_TOL, f"{what}: {name} differs from the reference by {rel_err(x, r):.2e}"


def check_attention() -> None:
    """neollm_135m's attention at a small width, output and every parameter gradient, with
    NEOLLM_EPILOGUE_IMPL triton in fp32 against torch in fp64, beside torch in fp32."""
    import dataclasses

    from neollm.model.args import FLAVORS
    from neollm.model.attention import Attention
    from neollm.model.rope import rope_cache

    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=64, n_heads=4, n_kv_heads=2, head_dim=16)
    torch.manual_seed(0)
    attn = Attention(args)
    with torch.no_grad():  # away from init: a router and gate that matter
        attn.router_bias.normal_()
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(1))
    rope = rope_cache(16, 11, 10000.0)

    def run(impl, dtype):
        ep.EPILOGUE_IMPL = impl
        module = attn.to(dtype)
        module.zero_grad()
        out = module(x.to(dtype), rope)
        out.square().mean().backward()
        return out.detach().double(), torch.cat([p.grad.flatten().double() for p in module.parameters()])

    calls = []
    kernel = ep.forward_kernel
    ep.forward_kernel = lambda *a: calls.append(1) or kernel(*a)
    try:
        want, ref, got = run("torch", torch.float64), run("torch", torch.float32), run("triton", torch.float32)
    finally:
        ep.EPILOGUE_IMPL, ep.forward_kernel = "torch", kernel
    assert len(calls) == 1, "the attention did not run the kernels"
    for name, x_, r, w in zip(("output", "gradients"), got, ref, want):
        err, ref_err = rel_err(x_, w), rel_err(r, w)
        if VERBOSE:
            print(f"attention {name}: error {err:.2e}, reference {ref_err:.2e}")
        assert err <= SLACK * ref_err + FLOOR, f"attention {name}: error {err:.2e}, reference {ref_err:.2e}"


def check_opcheck() -> None:
    """torch.library's checks of the op with the kernels (schema, fake tensor, autograd registration)."""
    for gate in ("elementwise", "headwise"):
        (y, v, u, z, g), _ = problem(2, 3, 4, 2, 16, 3, torch.bfloat16, gate, seed=4)
        args = [x.requires_grad_() for x in (y, v, u, z, g)]
        torch.library.opcheck(ep.epilogue_op, (*args, EPS, True),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


INJECTED = {
    "XSA's norm off by 1e-3 (forward)": [("norm = tl.sum(v * v, axis=1) + eps\n        for i",
                                          "norm = tl.sum(v * v, axis=1) * 1.001 + eps\n        for i")],
    "routing projections from the running y": [("tl.sum(y_in * uk[None, :], axis=1)", "tl.sum(y * uk[None, :], axis=1)")],
    "gate's sigmoid derivative missing": [("(dy2 * y2 * s * (1.0 - s))", "(dy2 * y2 * s)")],
    "router logits' gradient sign": [("(-qk * pk * rk * (1.0 - rk))", "(qk * pk * rk * (1.0 - rk))")],
    "directions' gradient without the dy2 term": [(" + (rk * pk)[:, None] * dy2", "")],
    "XSA's value gradient without the 2a term": [("(y - 2.0 * a[:, None] * v)", "y")],
    "value gradient of the group's last head only": [("dv += -a[:, None]", "dv = -a[:, None]")],
    "masked token rows of y and dout read as 1 (the directions' partial sums)": [
        ("y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)\n            dy2 = tl.load(dout_ptr + offs, mask=ok, other=0.0)",
         "y = tl.load(y_ptr + offs, mask=ok, other=1.0).to(tl.float32)\n            dy2 = tl.load(dout_ptr + offs, mask=ok, other=1.0)")],
}


def check_injected_errors_fail() -> None:
    # 37 tokens: not a multiple of BLOCK_N, so the masked lanes are exercised
    assert_injected_errors_fail(ep, INJECTED, lambda module: check(module, (1, 37, 4, 2, 16, 3), torch.float32))


if __name__ == "__main__":
    check(ep, (1, 37, 4, 2, 16, 3), torch.float32)  # the mutants' case, unmutated
    for shape, dtype, gate, steps in [
        ((2, 19, 8, 4, 64, 4), torch.float32, "elementwise", ("xsa", "routing")),   # neollm_135m's heads
        ((1, 40, 4, 4, 16, 2), torch.float32, "headwise", ("xsa", "routing")),      # no GQA
        ((1, 33, 6, 2, 24, 3), torch.float32, "none", ("xsa", "routing")),          # d not a power of two
        ((1, 33, 4, 2, 16, 3), torch.float32, "elementwise", ("xsa",)),
        ((1, 33, 4, 2, 16, 3), torch.float32, "elementwise", ("routing",)),
        ((1, 33, 4, 2, 16, 3), torch.float32, "headwise", ()),
        ((2, 19, 8, 4, 64, 4), torch.bfloat16, "elementwise", ("xsa", "routing")),
        ((1, 33, 4, 2, 16, 3), torch.bfloat16, "headwise", ("xsa", "routing")),
        ((1, 33, 4, 2, 16, 3), torch.float16, "elementwise", ("xsa", "routing")),
    ]:
        check(ep, shape, dtype, gate, steps, seed=shape[1])
    check_attention()
    check_opcheck()
    check_injected_errors_fail()
    print("ok")
    sys.exit(0)
