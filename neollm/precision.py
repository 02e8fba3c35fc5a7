"""The compute precision of NeoLLM's reductions and recurrences: at least fp32, fp64 kept.

One rule for every module and kernel reference: bf16/fp16 activations are upcast to fp32 for norms,
recurrences and solves; fp64 inputs stay fp64, so every path can be checked against its
reference in double precision."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_dtype", "upcast"]


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 if any given tensor is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
