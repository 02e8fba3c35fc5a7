"""The model-level decode steps: the blocks run with each mixer's ``step`` against its cached state.

``forward_step(model, tokens, cache)`` feeds T >= 1 new tokens at positions ``cache.pos ..
cache.pos + T - 1`` (a Python int): the prompt's prefill (T = prompt length) and dynamic decoding
(T = 1). Its logits equal, up to float rounding, the full forward's at those positions
(tests/test_generate.py checks every flavor in float64). Its shapes change with the position, so
it cannot be captured in a CUDA graph, and on a GPU its thousands of small ops per token make it
launch-bound.

``static_step(model, tokens, pos, cache)`` is the same computation for one token with the position
an int64 tensor [1] on the model's device: no shape depends on it and nothing reads it on the host,
so one call can be captured in a CUDA graph (or compiled once) and replayed for every later
position (neollm.inference.decoder runs it). It only writes into the cache's tensors in place and
advances neither ``pos`` nor ``cache.pos``: the caller does.

Both are thin loops: ``Block.forward`` with the mixer's call replaced by ``mixer.step`` (everything
else in a block is per token). The training forward (``NeoLLM.forward``) is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neollm.inference.cache import DecodeCache, allocate_cache
from neollm.model.model import NeoLLM

__all__ = ["forward_step", "static_step"]


def _run_blocks(model: NeoLLM, h: Tensor, cache: DecodeCache, pos: int | Tensor) -> Tensor:
    rope = model.rope
    for block, state in zip(model.layers.values(), cache.layers):
        h = block(h, rope, mixer=lambda a: block.mixer.step(a, state, pos, rope))  # noqa: B023 (called at once)
    return model.norm(h)


@torch.no_grad()
def forward_step(model: NeoLLM, tokens: Tensor, cache: DecodeCache) -> Tensor:
    """Logits [B, T, vocab] of ``tokens`` [B, T] placed at positions cache.pos.. (cache updated).

    The model must be in eval mode (dropout would make cached and full logits differ)."""
    if model.training:
        raise ValueError("forward_step needs model.eval() (dropout is not cached)")
    B, T = tokens.shape
    if cache.pos + T > cache.max_len:
        raise ValueError(f"{cache.pos + T} positions exceed the cache's max_len {cache.max_len} "
                         f"(the model's context is {model.rope.shape[0]})")
    if cache.batch is not None and B != cache.batch:
        raise ValueError(f"this cache holds {cache.batch} sequences, got a batch of {B}")
    h = model.tok_embeddings(tokens)
    if cache.batch is None:
        allocate_cache(model, cache, B, h.dtype, h.device)
    h = _run_blocks(model, h, cache, cache.pos)
    cache.pos += T
    return F.linear(h, model.head_weight())


def static_step(model: NeoLLM, tokens: Tensor, pos: Tensor, cache: DecodeCache) -> Tensor:
    """Logits [B, vocab] of ``tokens`` [B, 1] at position ``pos`` (int64 tensor [1] on the model's
    device; not advanced here); the cache's tensors are updated in place, ``cache.pos`` (the
    host-side count) is left to the caller. No host sync, no allocation of cache state: the cache
    must be allocated (``allocate_cache``, or a prefill through ``forward_step``).
    Run under ``torch.no_grad()`` with the model in eval mode."""
    h = _run_blocks(model, model.tok_embeddings(tokens), cache, pos)
    return F.linear(h[:, 0], model.head_weight())
