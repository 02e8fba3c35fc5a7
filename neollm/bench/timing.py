"""CUDA-event timing and the relative difference the kernel benchmarks share (neollm/bench/attention.py,
loss.py, polynorm.py, qk_path.py)."""

from __future__ import annotations

import torch


def time_ms(fn, steps: int = 20, warmup: int = 5) -> float:
    """Mean milliseconds of ``fn()`` over ``steps`` calls after ``warmup`` untimed ones, by CUDA events
    (the calls queue back to back: host overhead hidden behind the kernels is not counted)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS difference ``||a - b|| / ||b||``, in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())
