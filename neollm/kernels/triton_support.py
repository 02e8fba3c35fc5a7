"""Where the project's Triton kernels can run: a CUDA tensor, or any tensor under Triton's CPU
interpreter (``TRITON_INTERPRET=1``, how the CPU tests run them), in a dtype whose statistics fp32
holds (fp64 stays on the PyTorch references). One rule for the fused loss, LUCID and PolyNorm GLU."""

from __future__ import annotations

import importlib.util
import os

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # once: the check runs in every forward


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """Why a Triton kernel cannot serve tensors on ``device`` of these dtypes (None when it can)."""
    if not TRITON_INSTALLED:
        return "Triton is not installed (pip install triton)"
    if not (device.type == "cuda" or interpreting()):
        return f"the tensors are on {device}, not CUDA (or run under TRITON_INTERPRET=1)"
    if any(dt not in KERNEL_DTYPES for dt in dtypes):
        return f"dtypes {dtypes}: the kernels take fp32/bf16/fp16 (fp64 runs the reference)"
    return None
