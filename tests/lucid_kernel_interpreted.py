"""Checks of neollm/kernels/lucid.py's Triton kernels under Triton's CPU interpreter.

Run by tests/test_lucid_kernel.py in a subprocess with TRITON_INTERPRET=1 (the variable must be set
before Triton is imported). Exits non-zero on the first mismatch; prints "ok" at the end.

Tolerance: the kernels must be as close to the fp64 solution of the same inputs as the PyTorch
reference run in the same precision (fp32 math; a bf16 result is that rounded once): the relative
error over the whole tensor at most ``SLACK`` times the reference's own, plus ``FLOOR``. The
injected errors (a mutated copy of the kernels) must fail these checks.
"""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from neollm.kernels import lucid  # noqa: E402
from kernel_mutants import assert_injected_errors_fail  # noqa: E402  (tests/, this script's folder)
from neollm.model.attention_ops import lucid_values, rms_normalize  # noqa: E402

SLACK, FLOOR = 3.0, 2e-7
EPS = 1e-6
VERBOSE = os.environ.get("LUCID_CHECK_VERBOSE") == "1"  # print every error beside the reference's


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def problem(b: int, h: int, t: int, d: int, dtype: torch.dtype, keys: str, seed: int):
    """keys [B, H, T, d] (independent, or a shared direction + noise so that P has entries near 1),
    values and an upstream gradient, in ``dtype``; the keys in the model's layout ([B, T, H, d]
    seen as [B, H, T, d]: strided)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, t, h, d, generator=g)
    if keys == "correlated":
        k = torch.randn(b, 1, h, d, generator=g) + 0.2 * k
    v = torch.randn(b, t, h, d, generator=g)
    dx = torch.randn(b, h, t, d, generator=g)
    return k.to(dtype).transpose(1, 2), v.to(dtype).transpose(1, 2), dx


def check_kernels(kernels, b, h, t, d, block_rows, block_cols, dtype, keys, value_split=1, dots=None,
                  diagonal=None, solve="walk", key_grad_launch=None) -> None:
    """X, dkr and dv of the kernels against fp64, beside the reference's own error. ``key_grad_launch``:
    the key gradient's own launch (``lucid.key_grad``'s keywords); unset, the substitutions' rows and
    column chunk, so that every case also checks the key gradient at its tiles."""
    k, v, dx = problem(b, h, t, d, dtype, keys, seed=t + d)
    kr64, kr32 = rms_normalize(k.double(), EPS), rms_normalize(k, EPS)  # kr32: fp32 (the compute dtype)
    x64 = lucid.solve_reference(kr64, v.double())
    dk64, dv64 = lucid.solve_backward_reference(kr64, x64, dx.double())
    x32 = lucid.solve_reference(kr32, v)
    dk32, dv32 = lucid.solve_backward_reference(kr32, x32, dx)
    launch = dict(block_rows=block_rows, block_cols=block_cols, num_warps=4, value_split=value_split, dots=dots,
                  diagonal=diagonal, solve=solve)
    x = kernels.solve_kernel(kr32, v, **launch)
    key_grad_launch = key_grad_launch or dict(block_rows=block_rows, block_cols=block_cols)
    dk, dv = kernels.solve_backward_kernel(kr32, x, dx, key_grad_launch, **launch)
    assert x.dtype == dk.dtype == dv.dtype == torch.float32 and x.shape == v.shape
    what = (f"T {t} d {d} rows {block_rows} cols {block_cols} split {value_split} {diagonal} {solve} {dtype} {keys}"
            f" key gradient {key_grad_launch}")
    for name, got, ref, exact in (("X", x, x32, x64), ("dv", dv, dv32, dv64), ("dkr", dk, dk32, dk64)):
        if dtype != torch.float32 and name == "X":  # as lucid_values returns it
            got, ref = got.to(dtype), ref.to(dtype)
        err, ref_err = rel_err(got, exact), rel_err(ref, exact)
        if VERBOSE:
            print(f"{what}: {name} error {err:.2e}, reference {ref_err:.2e}")
        assert err <= SLACK * ref_err + FLOOR, f"{what}: {name} error {err:.2e}, reference {ref_err:.2e}"


def check_lucid_values(dtype) -> None:
    """lucid_values through the op with the kernels (autograd, RMS norm in PyTorch around the op)
    against fp64 through the reference: values and the gradients to k and v."""
    k, v, dx = problem(2, 2, 96, 32, dtype, "correlated", seed=5)
    k64, v64 = k.double().requires_grad_(), v.double().requires_grad_()
    x64 = lucid_values(k64, v64, EPS, impl="torch")
    want = (x64, *torch.autograd.grad(x64, (k64, v64), dx.double()))
    got, ref = [], []
    for impl, out in (("triton", got), ("torch", ref)):
        kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
        x = lucid_values(kk, vv, EPS, impl=impl)
        out += [x, *torch.autograd.grad(x, (kk, vv), dx.to(dtype))]
        assert all(t.dtype == dtype for t in out)
    for name, g, r, w in zip(("X", "dk", "dv"), got, ref, want):
        err, ref_err = rel_err(g, w), rel_err(r, w)
        assert err <= SLACK * ref_err + FLOOR, f"lucid_values {dtype}: {name} error {err:.2e}, reference {ref_err:.2e}"


def check_attention() -> None:
    """neollm_135m's attention layer (every attention technique on, LUCID among them) forward and
    backward with the kernels and with the reference, fp32, against the reference in fp64: the
    output and all parameter gradients (one relative error over them all)."""
    import dataclasses

    from neollm.model import attention_ops
    from neollm.model.args import FLAVORS
    from neollm.model.attention import Attention
    from neollm.model.rope import rope_cache

    args = dataclasses.replace(FLAVORS["neollm_135m"], dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
                               ffn_hidden_dim=96, vocab_size=61, max_seq_len=80, attention_dropout=0.0)
    assert args.lucid
    torch.manual_seed(0)
    att = Attention(args).double()
    x = torch.randn(2, 80, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cache = rope_cache(16, 80, 10_000.0).double()

    def run(dtype, impl):
        attention_ops.LUCID_IMPL = impl
        module = att.to(dtype)
        module.zero_grad()
        out = module(x.to(dtype), cache.to(dtype))
        out.square().mean().backward()
        return torch.cat([out.detach().flatten().double()] + [p.grad.flatten().double() for p in module.parameters()])

    original = attention_ops.LUCID_IMPL
    try:
        want = run(torch.float64, "torch")
        ref = run(torch.float32, "torch")
        got = run(torch.float32, "triton")
    finally:
        attention_ops.LUCID_IMPL = original
    err, ref_err = rel_err(got, want), rel_err(ref, want)
    if VERBOSE:
        print(f"attention: error {err:.2e}, reference {ref_err:.2e}")
    assert err <= SLACK * ref_err + FLOOR, f"attention: error {err:.2e}, reference {ref_err:.2e}"


def check_backward_reuses_the_forward_inverses() -> None:
    """Through the op: one diagonal-inverse launch per forward + backward (the forward's inverses, an op
    output kept for backward, reach the transposed walk), and the gradients of a backward that
    computes its own, bit for bit."""
    k, v, dx = problem(1, 2, 96, 32, torch.float32, "correlated", seed=6)
    kr, v = rms_normalize(k, EPS).requires_grad_(), v.requires_grad_()
    calls, original = [], lucid.diagonal_inverses

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    lucid.diagonal_inverses = counting
    try:
        x = lucid.lucid_solve(kr, v, True)
        dk, dv = torch.autograd.grad(x, (kr, v), dx)
    finally:
        lucid.diagonal_inverses = original
    assert len(calls) == 1, f"{len(calls)} diagonal-inverse launches in one forward + backward, not 1"
    want_dk, want_dv = lucid.solve_backward_kernel(kr.detach(), x.detach(), dx)  # its own inverses
    assert torch.equal(dk, want_dk) and torch.equal(dv, want_dv)


def check_compiled_op_follows_the_settings() -> None:
    """The launch settings that shape the op's outputs are op arguments read at each call: a compiled
    caller recompiles when DIAGONAL changes (a graph traced with the inverses' shape must not run the
    "substitute" op, whose inverses are empty), and its gradients are the eager ones under each setting."""
    from torch._dynamo.testing import CompileCounterWithBackend

    k, v, dx = problem(1, 2, 40, 16, torch.float32, "correlated", seed=4)
    kr = rms_normalize(k, EPS)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda a, b: lucid.lucid_solve(a, b, True) * 2, backend=counter, fullgraph=True)
    original = lucid.DIAGONAL
    try:
        for diagonal in ("inverse", "substitute"):
            lucid.DIAGONAL = diagonal
            grads = []
            for fn in (compiled, lambda a, b: lucid.lucid_solve(a, b, True) * 2):
                a, b = kr.clone().requires_grad_(), v.clone().requires_grad_()
                grads.append(torch.autograd.grad(fn(a, b), (a, b), dx))
            for got, want in zip(*grads):
                torch.testing.assert_close(got, want)
    finally:
        lucid.DIAGONAL = original
    assert counter.frame_count == 2, f"{counter.frame_count} compiles: a DIAGONAL change must recompile"


def check_opcheck() -> None:
    """torch.library's checks of the op with the kernels (schema, fake tensor, autograd registration)."""
    k, v, _ = problem(1, 2, 40, 16, torch.float32, "independent", seed=9)
    kr = rms_normalize(k, EPS).requires_grad_()
    torch.library.opcheck(lucid.lucid_solve_op, (kr, v.requires_grad_(), True, lucid.BLOCK_ROWS, lucid.DIAGONAL,
                                                 lucid.DOT_PRECISION),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


INJECTED = {
    "forward skips the last off-diagonal column block": [("c_end = r0\n", "c_end = r0 - BC\n")],
    "diagonal block's mask includes the diagonal": [("inside = rr[:, None] > rr[None, :]",
                                                     "inside = rr[:, None] >= rr[None, :]")],
    "key gradient's upper mask one block off": [("(cols[None, :] > rows[:, None]) & c_ok",
                                                 "(cols[None, :] > rows[:, None] + BR) & c_ok")],
    "back substitution in forward order": [("c = BR - 1 - i", "c = i")],
    "value column blocks overlap": [("vv = tl.program_id(1) * BV + tl.arange(0, BV)", "vv = tl.arange(0, BV)")],
}


INJECTED_INVERSE = {  # the diagonal step by inverted blocks (lucid.DIAGONAL "inverse")
    "inverse joins blocks twice too large": [("size = 2 << level", "size = 4 << level")],
    "transposed solve applies D^-1, not D^-T": [("                    dinv = tl.trans(dinv)\n",
                                                 "                    dinv = dinv\n")],
    "inverse read from the next block": [("n_blocks + r0 // BR) * BR * BR",
                                          "n_blocks + (r0 // BR + 1) % n_blocks) * BR * BR")],
    "inverse skips its last doubling level": [("for level in tl.static_range(0, LEVELS):",
                                               "for level in tl.static_range(0, LEVELS - 1):")],
    "inverse adds the coupling term": [("inv = inv - tl.dot(tl.dot(inv, coupling",
                                        "inv = inv + tl.dot(tl.dot(inv, coupling")],
    "inverse couples the halves the wrong way round": [("second_half[:, None] & ~second_half[None, :]",
                                                        "~second_half[:, None] & second_half[None, :]")],
}


INJECTED_LOOKBACK = {  # one program per row block, each taking the earlier blocks as published (lucid.SOLVE)
    "lookback skips the last earlier block": [("for s in range(0, step):", "for s in range(0, step - 1):")],
    "transposed lookback reads the blocks in forward order": [("                j = n_blocks - 1 - s\n",
                                                               "                j = s\n")],
    "lookback's transposed block uses D^-1": [("            dinv = tl.trans(dinv)\n        acc = tl.dot(dinv, acc, input_precision=DOTS)\n        acc = tl.where(",
                                               "            dinv = dinv\n        acc = tl.dot(dinv, acc, input_precision=DOTS)\n        acc = tl.where(")],
}


def check_lookback_stall_gives_nan() -> None:
    """A block whose earlier block never publishes (its program skipped: the ticket starts past it)
    gives NaN rows after max_spin polls instead of waiting forever; the blocks that need nothing
    unpublished stay finite."""
    k, v, _ = problem(1, 2, 96, 16, torch.float32, "independent", seed=3)
    kr = rms_normalize(k, EPS)
    kr, ks = lucid._head_strides(kr)
    v, vs = lucid._head_strides(v)
    b, h, t, d = kr.shape
    br, n_blocks = 32, 3
    dinv = lucid.diagonal_inverses(kr, block_rows=br)
    out = torch.zeros(b, h, t, d)
    sync = torch.zeros(b * h * n_blocks + 1, dtype=torch.int32)
    sync[-1] = b * h  # the tickets of block 0 are taken: no program solves it
    lucid._lookback_kernel[((n_blocks - 1) * b * h,)](kr, *ks, v, *vs, out, dinv, sync, sync[-1:], h, b * h, t, d,
                                                       0.25, 4.0, 3, TRANSPOSED=False, DOTS="ieee", BR=br, BD=16)
    assert out[:, :, br:].isnan().all() and not out[:, :, :br].isnan().any(), "a stalled block must give NaN rows"
    assert (sync[:-1].view(b * h, n_blocks)[:, 1:] == 1).all(), "every block that ran publishes its flag"


def check_injected_errors_fail() -> None:
    assert_injected_errors_fail(lucid, INJECTED, lambda module: check_kernels(
        module, 1, 2, 128, 32, 32, 32, torch.float32, "correlated", value_split=2, diagonal="substitute"))
    assert_injected_errors_fail(lucid, INJECTED_INVERSE, lambda module: check_kernels(
        module, 1, 2, 128, 32, 32, 32, torch.float32, "correlated", value_split=2, diagonal="inverse"))
    assert_injected_errors_fail(lucid, INJECTED_LOOKBACK, lambda module: check_kernels(
        module, 1, 2, 128, 32, 32, 32, torch.float32, "correlated", diagonal="inverse", solve="lookback"))


if __name__ == "__main__":
    for diagonal in lucid.DIAGONALS:  # the mutants' case, unmutated
        check_kernels(lucid, 1, 2, 128, 32, 32, 32, torch.float32, "correlated", 2, diagonal=diagonal)
    for b, h, t, d, rows, cols, dtype, keys, split, diagonal in [
        (2, 2, 128, 32, 32, 64, torch.float32, "independent", 1, "substitute"),
        (1, 3, 256, 64, 64, 64, torch.float32, "correlated", 2, "substitute"),
        (1, 2, 200, 48, 64, 32, torch.bfloat16, "correlated", 4, "substitute"),  # ragged T, d not 2^k
        (2, 2, 128, 64, 32, 32, torch.bfloat16, "independent", 1, "substitute"),
        (1, 1, 100, 16, 16, 64, torch.float16, "correlated", 1, "substitute"),
        (1, 3, 256, 64, 64, 64, torch.float32, "correlated", 1, "inverse"),
        (1, 2, 200, 48, 32, 32, torch.bfloat16, "correlated", 2, "inverse"),  # ragged: padded rows of D^-1
        (1, 1, 100, 16, 16, 64, torch.float16, "independent", 1, "inverse"),
    ]:
        check_kernels(lucid, b, h, t, d, rows, cols, dtype, keys, split, diagonal=diagonal)
    for b, h, t, d, rows, dtype, keys in [  # the look-back solve: one program per row block
        (1, 2, 128, 32, 32, torch.float32, "correlated"),  # the mutants' case, unmutated
        (2, 3, 256, 64, 64, torch.float32, "independent"),
        (1, 2, 200, 48, 32, torch.bfloat16, "correlated"),  # ragged T, d not 2^k
        (1, 1, 100, 16, 16, torch.float16, "correlated"),
    ]:
        check_kernels(lucid, b, h, t, d, rows, rows, dtype, keys, diagonal="inverse", solve="lookback")
    check_lookback_stall_gives_nan()
    for b, h, t, d, rows, dtype, keys, key_grad_launch in [  # the key gradient at tiles of its own
        (1, 2, 128, 32, 32, torch.float32, "correlated", dict(block_rows=64, block_cols=32, num_stages=2)),
        (1, 2, 200, 48, 32, torch.bfloat16, "correlated",  # ragged T, d not 2^k
         dict(block_rows=16, block_cols=64, num_warps=2, num_stages=3)),
        (1, 2, 300, 32, 32, torch.float32, "correlated", dict(block_rows=None)),  # KEY_GRAD_*: 3 blocks, ragged
    ]:
        check_kernels(lucid, b, h, t, d, rows, rows, dtype, keys, diagonal="inverse", key_grad_launch=key_grad_launch)
    # every precision of the products launches (the interpreter computes them all in fp32: their
    # accuracy is tests/gpu/test_lucid_gpu.py's)
    for dots in lucid.DOT_PRECISIONS:
        for diagonal in lucid.DIAGONALS:
            check_kernels(lucid, 1, 2, 128, 32, 32, 32, torch.float32, "correlated", 2, dots=dots, diagonal=diagonal)
        check_kernels(lucid, 1, 2, 128, 32, 32, 32, torch.float32, "correlated", dots=dots, diagonal="inverse",
                      solve="lookback")
    for dtype in (torch.float32, torch.bfloat16):
        check_lucid_values(dtype)
    check_attention()
    check_opcheck()
    check_backward_reuses_the_forward_inverses()
    check_compiled_op_follows_the_settings()
    check_injected_errors_fail()
    print("ok")
    sys.exit(0)
