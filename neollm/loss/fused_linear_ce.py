"""Linear + cross-entropy with the gradient computed during the forward pass, chunk by chunk.

Why: at NeoLLM's sizes the LM head is the largest single cost of a step, and Cut
Cross-Entropy's exact backward was measured much slower than the same math through one compiled
matmul + cross-entropy (BENCHMARKS.md, sixth session) — but that materialises all
[tokens x vocab] logits. This path keeps the speed of plain matmuls and bounds the memory: for
each chunk of ``chunk_size`` tokens it forms the logits (in the input dtype, fp32 accumulate),
computes the loss and d loss / d logits in fp32 (one Triton kernel on CUDA, writing the gradient
over the logits: neollm/loss/kernel.py; torch elsewhere),
and immediately turns them into the chunk's gradient for the hidden states and its contribution
to the weight's gradient. Backward only scales the stored gradients by the incoming grad. The same
idea as Liger-Kernel's fused linear cross-entropy (arXiv 2410.10989); exact, no filtering.

Cost: the three matmuls of an ordinary forward + backward (no recomputation); memory: one chunk
of logits and of their gradient, plus the gradients themselves (hidden-sized, and weight-sized in
fp32). Per token: ``lse - logit[target] (+ z_loss * lse^2)``; d/dlogits =
``softmax * (1 + 2 z_loss lse) - onehot(target)``; rows whose target is ``ignore_index`` add
nothing. Not twice differentiable.

Vocabulary padding: when V is not a multiple of ``vocab_multiple`` (default 64), the weight is
copied once per call into [Vp x D] with zero rows up to Vp = ceil(V / m) * m, so every [chunk x Vp]
logits / gradient buffer has an aligned row stride (V = 64,402 in bf16 is 128,804 bytes a row, not
16-byte aligned, which can push cuBLAS onto slower kernels; the compiled whole-logits CE gets padded
strides from inductor). The padded columns are masked to -inf before the log-sum-exp, so their
softmax and gradient are exactly 0 and the results equal the unpadded path. Cost: one copy of the
weight per call and Vp - V extra columns in each matmul; ``vocab_multiple=1`` turns it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neollm.loss import kernel as cross_entropy

_compiled_chunk = None
# ``addmm(..., out_dtype=float32)`` with half-precision operands: verified on CUDA with torch 2.11
# (BENCHMARKS.md); earlier releases lack it or reject an fp32 ``self``, so they keep the cast + add.
_ADDMM_OUT_DTYPE = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 11)


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, z_loss: float,
                         ignore_index: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the chunk's losses in fp32, d sum / d logits in the logits' dtype).

    Columns from ``vocab`` on (padding of the weight) are masked out: softmax and gradient 0 there."""
    lf = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    # Compare against a column index rather than one_hot / a mask tensor: it fuses into the same
    # kernel instead of materialising a [chunk, vocab] tensor.
    columns = torch.arange(lf.shape[-1], device=lf.device)
    if vocab < lf.shape[-1]:
        lf = torch.where(columns.unsqueeze(0) < vocab, lf, float("-inf"))
    valid = targets != ignore_index
    safe = targets.clamp_min(0)
    lse = torch.logsumexp(lf, dim=-1)
    target_logit = lf.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    per_token = lse - target_logit
    scale = torch.ones_like(lse)
    if z_loss:
        per_token = per_token + z_loss * lse * lse
        scale = scale + 2.0 * z_loss * lse
    loss = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
    grad = torch.exp(lf - lse.unsqueeze(-1)) * scale.unsqueeze(-1)
    grad = grad - (columns.unsqueeze(0) == safe.unsqueeze(-1)).to(grad.dtype)
    grad = grad * valid.unsqueeze(-1).to(grad.dtype)
    return loss, grad.to(logits.dtype)


def _chunk_fn(device: torch.device):
    """The chunk step for this device: the compiled torch function on CUDA, plain torch elsewhere.
    (Half-precision and fp32 logits on CUDA take the Triton kernel instead: ``_chunk_step``.)"""
    global _compiled_chunk
    if device.type != "cuda":
        return _chunk_loss_and_grad
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk


def _chunk_step(logits: torch.Tensor, targets: torch.Tensor, z_loss: float, ignore_index: int,
                vocab: int, need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk's loss sum, d sum / d logits): the two-pass Triton kernel where it serves these logits
    (neollm/loss/kernel.py; the gradient overwrites the logits, which nothing else holds),
    else ``_chunk_loss_and_grad`` (compiled on CUDA)."""
    if cross_entropy.available(logits):
        return cross_entropy.loss_and_grad_(logits, targets, z_loss, ignore_index, vocab, write_grad=need_grad)
    return _chunk_fn(logits.device)(logits, targets, z_loss, ignore_index, vocab)


def _pad_vocab(weight: torch.Tensor, vocab_multiple: int) -> torch.Tensor:
    """The weight [V, D] with zero rows appended up to a multiple of ``vocab_multiple`` (itself if
    V already is one)."""
    if vocab_multiple < 1:
        raise ValueError(f"vocab_multiple must be >= 1, got {vocab_multiple}")
    extra = -weight.shape[0] % vocab_multiple
    return F.pad(weight, (0, 0, 0, extra)) if extra else weight


def _accumulate_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``grad_w + g^T h`` with ``grad_w`` in fp32.

    On CUDA with a bf16/fp16 gradient chunk, one cuBLAS GEMM reads the half-precision operands and
    adds its fp32 result into ``grad_w`` (``addmm`` with ``out_dtype``): no rounding of the chunk's
    product to bf16, and no separate cast and add over the [V x D] weight (its measured saving per
    chunk: BENCHMARKS.md, fifth session, the ``addmm`` microbenchmark). Elsewhere (CPU, fp32 or
    fp64 chunks, torch before 2.11) the product is formed in g's dtype and added; so it is under
    torch.compile (the whole-model scope traces the loss): dynamo's addmm decomposition fails on
    ``out_dtype`` with torch 2.11 (TypeError "torch.dtype * FakeTensor"), and inductor can fuse the
    cast and add into the GEMM's epilogue."""
    half = (torch.float16, torch.bfloat16)
    if _ADDMM_OUT_DTYPE and grad_w.is_cuda and not torch.compiler.is_compiling() and g.dtype in half and grad_w.dtype == torch.float32:
        return torch.addmm(grad_w, g.t(), h.to(g.dtype), out_dtype=torch.float32)
    grad_w += (g.t() @ h).to(grad_w.dtype)
    return grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                z_loss: float, chunk_size: int, ignore_index: int, vocab_multiple: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        vocab = weight.shape[0]
        padded = _pad_vocab(weight, vocab_multiple)
        grad_h = torch.empty_like(hidden) if need_h else None
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(padded.shape, dtype=accumulate, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            loss, g = _chunk_step(h @ padded.t(), targets[start:start + chunk_size], z_loss, ignore_index, vocab)
            total = total + loss
            if need_h:
                # exact: the padded rows of the weight are zero, and so are g's padded columns
                torch.mm(g, padded, out=grad_h[start:start + chunk_size])
            if need_w:
                grad_w = _accumulate_weight_grad(grad_w, g, h)
        if need_w:
            grad_w = grad_w[:vocab]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None


def fused_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   z_loss: float = 0.0, chunk_size: int = 8192,
                                   ignore_index: int = -100, vocab_multiple: int = 64) -> torch.Tensor:
    """Sum over valid tokens of CE(hidden @ weight.T, targets) + z_loss * lse^2 (fp32 scalar).

    hidden [N, D], weight [V, D], targets [N]. Without grad mode it is a plain chunked loss. The
    logits are formed against the weight zero-padded to a multiple of ``vocab_multiple`` rows (1:
    no padding); the padded columns are masked out, so the result does not depend on it."""
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        with torch.no_grad():
            vocab = weight.shape[0]
            padded = _pad_vocab(weight, vocab_multiple)
            for s in range(0, hidden.shape[0], chunk_size):
                total = total + _chunk_step(hidden[s:s + chunk_size] @ padded.t(), targets[s:s + chunk_size],
                                            z_loss, ignore_index, vocab, need_grad=False)[0]
        return total
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, z_loss, chunk_size, ignore_index,
                                          vocab_multiple)
