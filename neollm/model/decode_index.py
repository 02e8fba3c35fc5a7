"""Cache indexing for a decode step at a Python-int or a device-tensor position.

A mixer's ``step(x, state, pos, rope)`` (neollm.inference) takes ``pos`` either as a Python int
(prefill and dynamic decoding: any T >= 1 new tokens, slices ``[pos:pos + T]``) or as an int64
tensor of shape [1] on the model's device (the static step: T = 1; no tensor shape may depend
on the position and nothing may read it on the host, so the step can be captured in a CUDA
graph). These helpers are the only place where the two differ, so the mixer writes each
incremental formula once: with a tensor position the whole [L] buffer is read and the
positions a slice would have cut off are masked (weight exactly 0), writes are ``index_copy_``.
Cache buffers are laid out [B, heads, L, d] (positions on dim 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

Position = int | Tensor


def check_position(pos: Position, new_tokens: int) -> None:
    """A tensor position serves one token (the static step); an int any T >= 1."""
    if isinstance(pos, Tensor) and (new_tokens != 1 or pos.shape != (1,)):
        raise ValueError(f"a tensor position must have shape [1] and feed one token; got shape "
                         f"{tuple(pos.shape)} and {new_tokens} tokens")


def positions(pos: Position, new_tokens: int, device: torch.device) -> Tensor:
    """The absolute positions [T] of the new tokens."""
    if isinstance(pos, Tensor):
        return pos
    return torch.arange(pos, pos + new_tokens, device=device)


def rows_at(table: Tensor, pos: Position, new_tokens: int) -> Tensor:
    """Rows ``pos .. pos + T - 1`` of a [positions, ...] table (RoPE)."""
    if isinstance(pos, Tensor):
        return table.index_select(0, pos)
    return table[pos:pos + new_tokens]


def write_rows(buffer: Tensor, rows: Tensor, pos: Position) -> None:
    """``buffer[:, :, pos:pos + T] = rows`` in place (the buffer keeps its address)."""
    rows = rows.to(buffer.dtype)
    if isinstance(pos, Tensor):
        buffer.index_copy_(2, pos, rows)
    else:
        buffer[:, :, pos:pos + rows.shape[2]] = rows


def visible(buffer: Tensor, pos: Position, new_tokens: int) -> Tensor:
    """The buffer's positions the new tokens may read: ``[:pos + T]``, or the whole buffer for a
    tensor position (``causal_mask`` then hides the positions after it)."""
    if isinstance(pos, Tensor):
        return buffer
    return buffer[:, :, :pos + new_tokens]


def causal_mask(pos: Position, new_tokens: int, length: int, device: torch.device) -> Tensor | None:
    """Boolean [T, length] mask over ``visible``'s positions: position j is read by the token at
    position i iff j <= i. None when every visible position may be read (one token, int position)."""
    if isinstance(pos, int) and new_tokens == 1:
        return None
    return torch.arange(length, device=device)[None, :] <= positions(pos, new_tokens, device)[:, None]


def first_or_cached(pos: Position, first: Tensor, cached: Tensor) -> Tensor:
    """``first`` at position 0, else ``cached`` (a host branch for an int, ``torch.where`` for a tensor)."""
    if isinstance(pos, Tensor):
        return torch.where((pos == 0).view(()), first, cached)
    return first if pos == 0 else cached


def over_cached(weights: Tensor, buffer: Tensor, pos: Position) -> Tensor:
    """``weights[..., :pos] @ buffer[:, :, :pos]``: weights [B, heads, T, visible length] applied to
    the rows cached before the new tokens (for a tensor position the columns >= pos are zeroed)."""
    if isinstance(pos, Tensor):
        before = torch.arange(weights.shape[-1], device=weights.device) < pos
        weights = torch.where(before, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
        return weights @ buffer
    return weights[..., :pos] @ buffer[:, :, :pos]
