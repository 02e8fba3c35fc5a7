"""CUDA-event timing and the relative difference the kernel benchmarks share (neollm/bench/attention.py,
loss.py, polynorm.py, qk_path.py, epilogue.py)."""

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


def forward_backward_costs(forward, step, steps: int = 20) -> tuple[float, float, float]:
    """``(forward ms, forward + backward ms, peak MiB above what was allocated before)`` of one path
    of a kernel benchmark: ``forward()`` without autograd, ``step()`` with its backward."""
    fwd_ms = time_ms(forward, steps)
    step_ms = time_ms(step, steps)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    return fwd_ms, step_ms, (torch.cuda.max_memory_allocated() - before) / 2**20


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS difference ``||a - b|| / ||b||``, in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())
