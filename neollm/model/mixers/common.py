"""Pieces shared by the fla-backed mixers (Gated DeltaNet, GLA, RetNet, Mamba2, RWKV-6): backend choice, fla's
Hopper workaround, the gated output norm, l2norm and the recurrence FLOPs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from neollm.precision import upcast

_BACKENDS = ("auto", "fla", "torch")


def resolve_backend(backend: str, x: Tensor, name: str, setting: str = "gdn_backend") -> str:
    """"auto" -> "fla" on CUDA, else "torch"; "fla" on a CPU input is an error naming the fix
    (``setting``: the model field that chose the backend)."""
    if x.dim() != 3:
        raise ValueError(f"{name}: expected x of shape [B, T, D], got {tuple(x.shape)}")
    if backend == "auto":
        return "fla" if x.is_cuda else "torch"
    if backend == "fla" and not x.is_cuda:
        raise ValueError(f"{name}: {setting}='fla' needs a CUDA input (fla's kernels are Triton); "
                         f"set {setting} = 'auto' or 'torch'")
    return backend


def check_decode_kernels(kernels: str, device, name: str) -> None:
    """Validate a decode state's ``kernels`` choice at allocation: one of "auto" / "fla" / "torch"; "fla" on a
    non-CUDA device is an error naming the fix."""
    if kernels not in _BACKENDS:
        raise ValueError(f"{name}: kernels must be one of {_BACKENDS}, got {kernels!r}")
    if kernels == "fla" and torch.device(device).type != "cuda":
        raise ValueError(f"{name}: kernels='fla' needs a CUDA device (fla's kernels are Triton); "
                         f"use kernels='auto' or 'torch'")


def pick_fla(backend: str, kernels: str, on_cuda: bool, name: str) -> bool:
    """Whether a decode step runs fla's kernels: never when the layer's backend or the state's ``kernels`` is
    "torch"; "fla" (kernels or backend) needs CUDA (a clear error elsewhere) and gets fla; "auto": fla on CUDA
    (for GLA, RetNet, Mamba2 and RWKV-6 since tests/gpu/test_mixers_step_gpu.py passed on an H200,
    benchmarks/gpu_tests_2026-12-05_0729; Gated DeltaNet always)."""
    if kernels == "torch" or backend == "torch":
        return False
    if kernels == "fla" or backend == "fla":
        if not on_cuda:
            raise ValueError(f"{name}: fla's kernels need a CUDA input; use kernels='torch' (or backend 'auto')")
        return True
    return on_cuda


def use_fla_step(backend: str, kernels: str, x: Tensor, name: str) -> bool:
    """``pick_fla`` for a step's input x."""
    return pick_fla(backend, kernels, x.is_cuda, name)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a decode state keeps recurrent state in: the compute dtype (fp32, fp64 kept)."""
    return torch.promote_types(dtype, torch.float32)


def causal_conv_step(x: Tensor, weight: Tensor, state: Tensor, bias: Tensor | None = None) -> Tensor:
    """Causal depthwise conv (no activation) over new inputs x [B, T, C] continuing from ``state`` [B, W-1, C]
    (the last W-1 inputs; zeros at the start = the training path's causal zero padding), updated in place.
    weight [C, 1, W] (nn.Conv1d's). A multiply-sum over the windows: F.conv1d's CPU path costs tens of ms per
    call at T = 1, and this has no data-dependent branch (CUDA-graph safe)."""
    W = weight.shape[-1]
    full = torch.cat([state.to(x.dtype), x], dim=1)  # [B, W-1+T, C]
    y = (full.unfold(1, W, 1) * weight.squeeze(1).to(x.dtype)).sum(-1)  # y_t = sum_j w[:, j] full[t + j]
    if bias is not None:
        y = y + bias.to(x.dtype)
    state.copy_(full[:, full.shape[1] - (W - 1):])
    return y


def check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def linear_attention_recurrence_flops(num_heads: int, k: int, v: int, chunk_size: int = 64) -> int:
    """Training FLOPs per token of a chunked gated linear-attention core, H heads of key K and value V.

    Per head and token, forward, counting full C x C blocks as the kernels compute them: Q K^T inside the chunk
    2CK, (scores) V 2CV, Q S across chunks 2KV, the state update K^T V 2KV; decays are elementwise (not
    counted). Times 3 for forward + backward: 3 (2CK + 2CV + 4KV) per head.
    """
    return 3 * num_heads * (2 * chunk_size * (k + v) + 4 * k * v)


_fla_workaround_checked = False


@torch.compiler.disable
def ensure_fla_workaround() -> None:
    """Install neollm.kernels.fla_compat's Hopper workaround once, before the first fla kernel."""
    global _fla_workaround_checked
    if not _fla_workaround_checked:
        from neollm.kernels.fla_compat import install_fla_hopper_workaround

        install_fla_hopper_workaround()
        _fla_workaround_checked = True


class GatedRMSNorm(nn.Module):
    """Holds ``o_norm.weight`` ([head_v_dim], init 1) and computes fla's FusedRMSNormGated(swish) in torch."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        x32 = upcast(x)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y * upcast(self.weight) * F.silu(upcast(gate))
        return y.to(x.dtype)


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """fla's l2norm: x / sqrt(|x|^2 + eps), eps inside the sqrt, in the compute precision."""
    x32 = upcast(x)
    return x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + eps)
