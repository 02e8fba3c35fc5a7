"""Language-model loss from the final hidden states and the (tied) head weight.

The model computes its own loss (``NeoLLM.forward(tokens, labels)``) so that the head weight is
used while FSDP2 has it gathered, and so the [tokens x vocab] logits never exist at once:

* ``"cce"`` — Cut Cross-Entropy (Wijmans et al., arXiv 2411.09009; the ``cut-cross-entropy``
  package): blockwise matmul and online log-sum-exp in SRAM, CUDA only. Called with
  ``filter_eps=None``, the exact gradient: the package's default filters small gradient entries,
  which its authors warn hurts pretraining.
* ``"chunked"`` — the same math in plain PyTorch: logits for ``chunk_size`` tokens at a time,
  recomputed in backward (activation checkpointing), so peak memory is one chunk of logits.
  Runs anywhere; the CPU path and the reference CCE is tested against.
* ``"fused"`` — neollm.loss.fused_linear_ce: chunks of logits through plain matmuls with the gradient
  formed in the forward pass (no recomputation), the softmax part one Triton kernel on CUDA
  (neollm/loss/kernel.py). Exact; memory one chunk of logits. Its logits are padded to a
  multiple of 64 columns (aligned matmuls, padding masked out). Measured faster than CCE and than
  compiled logits + CE at both vocabularies, with a fraction of the latter's memory.
* ``"logits"`` — the whole [tokens x vocab] logits materialised and a fp32 log-sum-exp over them,
  compiled on CUDA: what torchtitan's stock trainer does. In a whole step it is slower than
  ``fused`` and holds much more memory. For comparisons.
* ``"auto"`` — ``fused`` on CUDA, ``chunked`` elsewhere. In a whole step at the Qwen3 vocabulary
  ``fused`` was faster than CCE, while CCE held less memory, so ``cce`` stays the choice when
  memory binds.

The timings and memory behind these choices are in BENCHMARKS.md (sixth session: the loss kernel,
``fused`` against CCE and compiled logits at both vocabularies, whole ``neollm_135m`` steps; fifth
session: ``--loss logits`` in a whole ``plain`` step), not here: a docstring's numbers go stale.

z-loss (PaLM, arXiv 2204.02311 §5): ``z_loss * logsumexp(logits)^2`` per token. CCE returns only
the per-token NLL, so the log-sum-exp is recovered exactly as ``nll + <h, w[target]>`` — one
indexed dot product, no logits — and its gradient flows through both terms.
All functions return the SUM over non-ignored tokens (torchtitan divides by the global count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from neollm.errors import ConfigError
from neollm.loss.settings import IGNORE_INDEX, LossSettings


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = _at_least_fp32(hidden @ weight.t())
    target_logit = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return logits.logsumexp(-1) - target_logit


def chunked_token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      chunk_size: int) -> torch.Tensor:
    """Per-token NLL [N] (fp32 or fp64), logits materialised ``chunk_size`` rows at a time."""
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        args = (hidden[start:end], weight, targets[start:end])
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            pieces.append(checkpoint(_chunk_nll, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_nll(*args))
    return torch.cat(pieces)


def logits_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    z_loss: float) -> torch.Tensor:
    """Sum of NLL (+ z-loss) over valid tokens from the whole logits [N, V] (fp32 or fp64 math)."""
    logits = _at_least_fp32(hidden @ weight.t())
    lse = logits.logsumexp(-1)
    target_logit = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    valid = targets != IGNORE_INDEX
    zero = lse.new_zeros(())
    loss = torch.where(valid, lse - target_logit, zero).sum()
    if z_loss:
        loss = loss + z_loss * torch.where(valid, lse, zero).pow(2).sum()
    return loss


_compiled_logits_loss_sum = None


def _logits_loss_fn(device: torch.device):
    """``logits_loss_sum`` compiled once per process on CUDA (inductor fuses the cast, the
    log-sum-exp and the gather, and keeps the logits in bf16 for backward); eager elsewhere."""
    global _compiled_logits_loss_sum
    if device.type != "cuda":
        return logits_loss_sum
    if _compiled_logits_loss_sum is None:
        _compiled_logits_loss_sum = torch.compile(logits_loss_sum)
    return _compiled_logits_loss_sum


def cce_token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [N] (fp32) through Cut Cross-Entropy's exact Triton kernels."""
    from cut_cross_entropy import linear_cross_entropy

    nll = linear_cross_entropy(
        hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none", filter_eps=None,
        impl="cce",
    )
    return nll.float()


def _resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` names here. ``auto``: ``fused`` on CUDA at every vocabulary (the
    fastest measured: see the module docstring), ``chunked`` elsewhere."""
    if impl == "auto":
        if device.type != "cuda":
            return "chunked"
        return "fused"
    if impl == "cce" and device.type != "cuda":
        raise ConfigError("[loss] impl = 'cce' needs CUDA (Triton kernels); use 'chunked' or 'auto'")
    return impl


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             settings: LossSettings = LossSettings()) -> torch.Tensor:
    """Sum over valid tokens of CE(hidden @ weight.T, labels) (+ z-loss); hidden [..., D]."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = labels.reshape(-1)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    impl = _resolve_impl(settings.impl, hidden.device)
    if impl == "fused":
        from neollm.loss.fused_linear_ce import fused_linear_cross_entropy_sum

        return fused_linear_cross_entropy_sum(hidden, weight, targets, settings.z_loss,
                                              settings.chunk_size, IGNORE_INDEX)
    if impl == "logits":
        return _logits_loss_fn(hidden.device)(hidden, weight, targets, settings.z_loss)
    if impl == "cce":
        nll = cce_token_nll(hidden, weight, targets)
    else:
        nll = chunked_token_nll(hidden, weight, targets, settings.chunk_size)
    valid = targets != IGNORE_INDEX
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    loss = nll.sum()
    if settings.z_loss:
        target_logit = (_at_least_fp32(hidden) * _at_least_fp32(weight[targets.clamp_min(0)])).sum(-1)
        lse = torch.where(valid, nll + target_logit, torch.zeros_like(nll))
        loss = loss + settings.z_loss * lse.pow(2).sum()
    return loss


def logits_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain CE summed over valid tokens, from materialised logits (validation path, reference)."""
    return F.cross_entropy(
        _at_least_fp32(logits.flatten(0, -2)), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def neollm_loss(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The TrainSpec loss: the model already returned the loss sum (training), or logits (eval)."""
    if pred.ndim == 0:
        return pred
    return logits_cross_entropy_sum(pred, labels)


def build_neollm_loss(job_config, **kwargs):
    """TrainSpec ``build_loss_fn``; nothing to compile: the heavy part runs inside the model."""
    del job_config, kwargs
    return neollm_loss
