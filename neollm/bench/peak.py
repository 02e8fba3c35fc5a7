"""The bf16 peak that MFU divides by: measured in the benchmark's own run, or a named datasheet figure.

A constant typed once ("800 TFLOP/s, measured") cannot be checked; a GEMM timed in the same process,
on the same device, next to the numbers it normalises, can. The datasheet figure is torchtitan's
(``torchtitan.tools.utils.get_peak_flops``: dense bf16 from NVIDIA's/AMD's pages), so MFU computed
with it matches torchtitan's own MFU.
"""

from __future__ import annotations

import dataclasses
import time

import torch


@dataclasses.dataclass(frozen=True)
class Peak:
    tflops: float
    source: str
    """How ``tflops`` was obtained, for the table and the JSON rows."""


def measure_bf16_tflops(device: torch.device, size: int = 8192, iters: int = 20, warmup: int = 3) -> float:
    """Dense bf16 matmul rate: ``iters`` products of two ``size`` x ``size`` matrices, timed after
    ``warmup`` untimed ones (2 size^3 FLOPs each)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        torch.mm(a, b)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b)
    sync()
    seconds = (time.perf_counter() - start) / iters
    return 2 * size**3 / seconds / 1e12


def datasheet_tflops(device: torch.device) -> Peak:
    """torchtitan's datasheet figure for this GPU (it has none for CPUs, and falls back to the
    A100's for GPUs it does not know: refused here rather than reported as this device's)."""
    if device.type != "cuda":
        raise ValueError(f"no datasheet bf16 peak for device {device.type!r}: use --peak-tflops measure or a number")
    from torchtitan.tools.utils import get_peak_flops

    name = torch.cuda.get_device_name(device)
    known = ("A100", "H100", "H200", "H20", "B200", "MI355X", "MI300X", "MI325X", "MI250X", "l40s")
    if not any(k in name for k in known):
        raise ValueError(f"torchtitan has no datasheet bf16 peak for {name!r}: use --peak-tflops measure or a number")
    return Peak(get_peak_flops(name) / 1e12, f"datasheet ({name}, torchtitan get_peak_flops)")


def resolve_peak(spec: str, device: torch.device) -> Peak:
    """``--peak-tflops``: "measure" (a bf16 GEMM timed now: 8192^3 on CUDA, 1024^3 elsewhere),
    "datasheet", or a number given by the user."""
    if spec == "measure":
        size = 8192 if device.type == "cuda" else 1024
        tflops = measure_bf16_tflops(device, size=size, iters=20 if device.type == "cuda" else 3)
        return Peak(tflops, f"measured (bf16 GEMM {size}^3 on {device_name(device)}, this run)")
    if spec == "datasheet":
        return datasheet_tflops(device)
    try:
        value = float(spec)
    except ValueError:
        raise ValueError(f"--peak-tflops {spec!r}: write measure, datasheet or a number in TFLOP/s") from None
    if not value > 0:
        raise ValueError(f"--peak-tflops {spec!r} must be positive")
    return Peak(value, "given on the command line")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
