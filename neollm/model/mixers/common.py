"""Pieces shared by the fla-backed mixers (Gated DeltaNet, GLA, RetNet, Mamba2, RWKV-6): backend choice and
the recurrence FLOPs."""

from __future__ import annotations

from torch import Tensor

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
