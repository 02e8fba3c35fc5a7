"""Where the project's Triton kernels can run: a CUDA tensor, or any tensor under Triton's CPU
interpreter (``TRITON_INTERPRET=1``, how the CPU tests run them), in a dtype whose statistics fp32
holds (fp64 stays on the PyTorch references), from Ampere on for the technique kernels (the fused
loss runs on older GPUs too). One rule for the fused loss and the technique kernels, and one for
resolving a kernel switch ("auto" | "triton" | "torch": LUCID, PolyNorm GLU, q/k path, epilogue)."""

from __future__ import annotations

import importlib.util
import os

import torch

from neollm.errors import ConfigError

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # once: the check runs in every forward


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device, dtypes: tuple[torch.dtype, ...], need_ampere: bool = True) -> str | None:
    """Why a Triton kernel cannot serve tensors on ``device`` of these dtypes (None when it can).
    ``need_ampere=False`` for a kernel that runs on older GPUs too (the fused loss: fp32 statistics of
    each row, no TF32 products), so that it keeps serving V100s and T4s as before the technique kernels."""
    if not TRITON_INSTALLED:
        return "Triton is not installed (pip install triton)"
    if not (device.type == "cuda" or interpreting()):
        return f"the tensors are on {device}, not CUDA (or run under TRITON_INTERPRET=1)"
    if any(dt not in KERNEL_DTYPES for dt in dtypes):
        return f"dtypes {dtypes}: the kernels take fp32/bf16/fp16 (fp64 runs the reference)"
    if need_ampere and device.type == "cuda":
        old = _older_than_ampere(torch.cuda.current_device() if device.index is None else device.index)
        if old:
            return f"{old} is older than Ampere (compute capability < 8.0)"
    return None


@torch.compiler.assume_constant_result
def _older_than_ampere(index: int) -> str:
    """The name of GPU ``index`` if it predates Ampere, else "": bf16 and TF32 (LUCID's default tf32x3
    products) need Ampere or later, and the kernels are checked on Hopper (tests/gpu). A constant to
    torch.compile, so the check in a compiled block's forward breaks no graph."""
    if torch.cuda.get_device_capability(index) >= (8, 0):
        return ""
    return torch.cuda.get_device_name(index)


KERNEL_IMPLS = ("auto", "triton", "torch")


def resolve_impl(impl: str, reason: str | None, on_cuda: bool, switch: str, short: str) -> bool:
    """True when a kernel switch set to ``impl`` (one of KERNEL_IMPLS) takes the Triton kernels for
    tensors the kernels cannot serve for ``reason`` (None: they can) and that are ``on_cuda`` or not:
    "triton" always (an error if they cannot run), "auto" on CUDA where they can, "torch" never.
    ``switch`` names the setting in full (module attribute and environment variable), ``short`` in the
    'cannot run' error."""
    if impl not in KERNEL_IMPLS:
        raise ConfigError(f"{switch} must be one of {KERNEL_IMPLS}, got {impl!r}")
    if impl == "triton" and reason is not None:
        raise ConfigError(f"{short} 'triton' cannot run: {reason}; set it to 'auto' or 'torch'")
    return impl == "triton" or (impl == "auto" and reason is None and on_cuda)
