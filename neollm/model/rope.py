"""Rotary position embedding (rotate-half convention, as in Llama/Qwen checkpoints)."""

from __future__ import annotations

import torch


def rope_cache(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """[max_seq_len, head_dim] table: cos in the first half of the last dim, sin in the second."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by the first T rows of the cache; computed in fp32 (or fp64)."""
    seq_len, half = x.shape[1], x.shape[-1] // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    cos = cache[:seq_len, :half].to(compute)[None, :, None, :]
    sin = cache[:seq_len, half:].to(compute)[None, :, None, :]
    xf = x.to(compute)
    x1, x2 = xf[..., :half], xf[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.type_as(x)
