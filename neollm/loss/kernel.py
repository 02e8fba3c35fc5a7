"""Cross-entropy loss and its gradient for one chunk of logits, in place, as one Triton kernel.

Why: in the fused loss (neollm/loss/fused_linear_ce.py) the step after each chunk's logits GEMM turns
[rows x vocab] logits into per-row losses and d loss / d logits. Compiled by inductor, that step
read the logits three times (max, sum of exponentials, gradient) and wrote a new gradient buffer,
the largest non-GEMM kernel of a `plain` step in the profile (BENCHMARKS.md, sixth session).
Here each program owns one row and makes two passes over it: an online max / sum-of-exponentials
(Milakov & Gimelshein, arXiv 1805.02867) and then the gradient, written over the logits. Only about
one row per streaming multiprocessor is in flight, so the second read of a row mostly hits L2; the
gradient needs no buffer of its own.

Math per row with target t (``ignore_index``: loss and gradient 0), z = ``z_loss``:
``lse = log sum_j exp(x_j)`` over the real vocabulary columns, ``loss = lse - x_t + z lse^2`` and
``d loss / d x_j = softmax_j (1 + 2 z lse) - [j == t]``; columns from ``vocab`` on (the weight's
zero padding) get gradient 0. Statistics in fp32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch

from neollm.kernels.triton_support import unavailable_reason

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA torch builds and is a dependency on Linux
    triton = None

# One program per row, up to BLOCK_MAX columns per step of each pass, one warp per 512 columns of a
# block: the fastest of the launch shapes timed (BENCHMARKS.md, sixth session, the table of launch
# shapes against inductor's compiled version; `tools/bench_loss.py --chunk-kernel` re-measures).
BLOCK_MAX = 16384


def launch_shape(n_cols: int) -> tuple[int, int]:
    """(block, num_warps) for rows of ``n_cols`` columns: the next power of two up to BLOCK_MAX."""
    block = min(BLOCK_MAX, triton.next_power_of_2(max(n_cols, 1)))
    return block, max(1, min(32, block // 512))


def available(logits: torch.Tensor) -> bool:
    """Whether the kernel serves these logits: Triton importable and a CUDA tensor (or Triton's CPU
    interpreter) in a dtype whose statistics fp32 holds (not fp64: the torch path keeps that)."""
    return unavailable_reason(logits.device, (logits.dtype,), need_ampere=False) is None


if triton is not None:

    @triton.jit
    def _loss_and_grad_rows(logits_ptr, row_stride, targets_ptr, target_stride, losses_ptr, n_cols, vocab,
                            z_loss, ignore_index, WRITE_GRAD: tl.constexpr, HAS_Z: tl.constexpr,
                            BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row * target_stride)
        valid = target != ignore_index
        # Read before pass 2 overwrites the row; pass 1's block reductions (barriers across the
        # program's warps) order this load before any warp's pass-2 store. Clamped into the
        # vocabulary so that no target, even an out-of-range one, reads outside the row.
        safe_target = tl.minimum(tl.maximum(tl.where(valid, target, 0), 0), vocab - 1)
        target_logit = tl.load(base + safe_target).to(tl.float32)
        # pass 1: running max and sum of exponentials rescaled to it
        running_max = tl.full((), float("-inf"), tl.float32)
        running_sum = tl.zeros((), tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, 0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        loss = lse - target_logit
        scale = 1.0
        if HAS_Z:
            loss += z_loss * lse * lse
            scale = 1.0 + 2.0 * z_loss * lse
        tl.store(losses_ptr + row, tl.where(valid, loss, 0.0))
        if WRITE_GRAD:
            # pass 2: gradient over the logits (padding columns: exp(-inf) = 0)
            keep = tl.where(valid, 1.0, 0.0)
            tl.debug_barrier()  # every warp has read the target logit (also when pass 1 had one block)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                in_row = cols < n_cols
                x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
                grad = tl.exp(x - lse) * scale - tl.where(cols == target, 1.0, 0.0)
                tl.store(base + cols, (grad * keep).to(logits_ptr.dtype.element_ty), mask=in_row)


def loss_and_grad_(logits: torch.Tensor, targets: torch.Tensor, z_loss: float, ignore_index: int,
                   vocab: int, write_grad: bool = True, block: int | None = None,
                   num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the rows' losses in fp32, ``logits`` overwritten with d sum / d logits).

    logits [rows, cols] with unit column stride, columns from ``vocab`` on are padding; targets
    [rows] integer in [0, vocab) or ``ignore_index`` for rows that count for nothing (the model's
    labels: the trainer's preflight checks the vocabulary covers the tokenizer). With ``write_grad=False`` the
    logits are left as they are (evaluation). ``block`` / ``num_warps``: default ``launch_shape``."""
    if triton is None:
        raise RuntimeError("neollm.loss.kernel needs Triton (pip install triton)")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with unit column stride, got shape {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    rows, cols = logits.shape
    if not 0 < vocab <= cols or targets.shape != (rows,):
        raise ValueError(f"vocab {vocab} must be in (0, {cols}] and targets of shape ({rows},), "
                         f"got {tuple(targets.shape)}")
    if block is None or num_warps is None:
        block, num_warps = launch_shape(cols)
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _loss_and_grad_rows[(rows,)](logits, logits.stride(0), targets, targets.stride(0), losses, cols, vocab,
                                     float(z_loss), int(ignore_index), WRITE_GRAD=write_grad, HAS_Z=bool(z_loss),
                                     BLOCK=block, num_warps=num_warps)
    return losses.sum(), logits
