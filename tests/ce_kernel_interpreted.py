"""Checks of neollm/loss/kernel.py run under Triton's CPU interpreter.

Run by tests/test_loss.py in a subprocess with TRITON_INTERPRET=1 (the variable must be set before
Triton is imported, so it cannot share the test process). Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from neollm.loss.fused_linear_ce import _chunk_loss_and_grad, fused_linear_cross_entropy_sum  # noqa: E402
from neollm.loss import kernel as cross_entropy  # noqa: E402

IGNORE = -100


def check_chunk(rows: int, cols: int, vocab: int, dtype: torch.dtype, z_loss: float, block: int) -> None:
    """Kernel vs the torch chunk function on the same logits: loss and gradient (including padding
    columns, ignored rows, targets on the first and last real column)."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    logits = (3 * torch.randn(rows, cols, generator=gen)).to(dtype)
    logits[:, vocab:] = 0  # what the zero-padded weight gives
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[0], targets[-1] = 0, vocab - 1
    targets[1::3] = IGNORE
    want_loss, want_grad = _chunk_loss_and_grad(logits.clone(), targets, z_loss, IGNORE, vocab)
    if rows % 2:  # a strided view of the targets (as a slice of [B, T] labels can be)
        targets = torch.stack([targets, torch.full_like(targets, vocab - 1)], 1)[:, 0]
        assert targets.stride(0) == 2
    assert cross_entropy.available(logits)
    loss, grad = cross_entropy.loss_and_grad_(logits, targets, z_loss, IGNORE, vocab, block=block, num_warps=4)
    assert grad.data_ptr() == logits.data_ptr() and grad.dtype == dtype
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 4e-3)
    assert not grad[1::3].any() and not grad[:, vocab:].any()
    rows_sum = grad.float()[targets != IGNORE].sum(-1)  # softmax sums to 1 minus the one-hot: ~0 (z = 0)
    if not z_loss:
        assert rows_sum.abs().max() < 1e-2, rows_sum


def check_eval_leaves_logits() -> None:
    logits = torch.randn(5, 70)
    targets = torch.tensor([1, 2, IGNORE, 69, 0])
    before = logits.clone()
    loss, _ = cross_entropy.loss_and_grad_(logits, targets, 0.0, IGNORE, 70, write_grad=False, block=32, num_warps=4)
    assert torch.equal(logits, before)
    torch.testing.assert_close(loss, _chunk_loss_and_grad(before, targets, 0.0, IGNORE, 70)[0])


def check_fused_loss_end_to_end() -> None:
    """fused_linear_cross_entropy_sum through the kernel (fp32 and bf16 inputs) vs fp64 through
    the torch path: value and both gradients."""
    gen = torch.Generator().manual_seed(7)
    n, d, v = 19, 16, 37
    hidden64 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight64 = 0.3 * torch.randn(v, d, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::4] = IGNORE
    h, w = hidden64.clone().requires_grad_(), weight64.clone().requires_grad_()
    ref = fused_linear_cross_entropy_sum(h, w, targets, z_loss=1e-2, chunk_size=8, ignore_index=IGNORE)
    ref_h, ref_w = torch.autograd.grad(ref, (h, w))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        h, w = hidden64.to(dtype).requires_grad_(), weight64.to(dtype).requires_grad_()
        loss = fused_linear_cross_entropy_sum(h, w, targets, z_loss=1e-2, chunk_size=8, ignore_index=IGNORE)
        gh, gw = torch.autograd.grad(loss, (h, w))
        torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(gh.double(), ref_h, rtol=tol, atol=tol)
        torch.testing.assert_close(gw.double(), ref_w, rtol=tol, atol=tol)
        with torch.no_grad():
            value = fused_linear_cross_entropy_sum(h, w, targets, z_loss=1e-2, chunk_size=8, ignore_index=IGNORE)
        torch.testing.assert_close(value, loss.detach())


if __name__ == "__main__":
    for rows, cols, vocab, dtype, z_loss, block in [
        (7, 100, 100, torch.float32, 0.0, 32),     # vocab not a multiple of the block
        (6, 128, 97, torch.float32, 1e-2, 32),     # padding columns, z-loss
        (9, 192, 150, torch.bfloat16, 1e-3, 64),
        (4, 64, 64, torch.float16, 0.0, 128),      # one block wider than the row
    ]:
        check_chunk(rows, cols, vocab, dtype, z_loss, block)
    check_eval_leaves_logits()
    check_fused_loss_end_to_end()
    print("ok")
    sys.exit(0)
