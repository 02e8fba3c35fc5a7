"""What every GPU test file shares: its markers and the error metric.

``GPU_ONLY`` marks a module's tests ``gpu`` and skips them without a CUDA device (the CPU CI);
``rel_err`` is the relative RMS error over the whole tensor, ||a - b|| / ||b|| in float64, so a
broken kernel's O(1) error cannot pass while TF32 / bf16 rounding can.
"""

from __future__ import annotations

import pytest
import torch

GPU_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
