"""The decode cache: one state per layer, made by the layer's own mixer.

Every token mixer that supports cached decoding has ``new_state(batch, max_len, dtype, device,
kernels)`` and ``step(x, state, pos, rope)`` (the protocol: neollm/model/attention.py,
neollm/model/mixers/*). The cache only holds their states and the position; what a state holds
is the mixer's business. Every tensor is allocated (zeros) before the first step and afterwards
only written in place, so its address is fixed for the cache's life: what the static step's CUDA
graph needs (``tensors()`` lists them for reset and address checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from neollm.model.model import NeoLLM

__all__ = ["KERNELS", "DecodeCache", "new_cache", "allocate_cache"]

KERNELS = ("auto", "fla", "torch")
"""Recurrence kernels of the mixers' steps: "auto" fla on CUDA (layer backend permitting), else torch."""


@dataclass
class DecodeCache:
    max_len: int
    pos: int = 0                 # host-side count of positions filled
    kernels: str = "auto"
    batch: int | None = None     # set by allocate_cache
    layers: list = field(default_factory=list)  # one mixer state per layer, made by allocate_cache

    def tensors(self) -> list[Tensor]:
        """Every allocated state tensor (for reset and address checks)."""
        return [t for state in self.layers for t in state.tensors()]

    def reset(self) -> None:
        """Back to position 0 for a new sequence of the same batch size, in place (zeros)."""
        for t in self.tensors():
            t.zero_()
        self.pos = 0


def new_cache(model: NeoLLM, max_len: int | None = None, kernels: str = "auto") -> DecodeCache:
    """An empty cache for up to ``max_len`` positions (default and limit: the RoPE table's length);
    its states are allocated by ``allocate_cache`` (``forward_step`` does it on its first call)."""
    limit = model.rope.shape[0]
    max_len = limit if max_len is None else max_len
    if max_len > limit:
        raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {limit} (the RoPE table)")
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be 'auto', 'fla' or 'torch', got {kernels!r}")
    stepless = sorted({b.mixer_code for b in model.layers.values() if not callable(getattr(b.mixer, "step", None))})
    if stepless:
        raise ValueError(
            f"cached decoding needs mixers with a decode step; this model's {', '.join(stepless)} layers have "
            "none: decode without the cache (use_cache=False, tools/generate.py --no-cache)"
        )
    return DecodeCache(max_len=max_len, kernels=kernels)


def allocate_cache(model: NeoLLM, cache: DecodeCache, batch: int, dtype: torch.dtype,
                   device: torch.device | str) -> None:
    """Allocate every layer's state (zeros) for ``batch`` sequences whose activations are ``dtype``
    (state kept in the compute dtype is fp32, or fp64 for fp64 models). Afterwards the steps only
    write in place. ``forward_step`` calls this on its first step; the static decoder up front."""
    cache.layers = [block.mixer.new_state(batch, cache.max_len, dtype, device, cache.kernels)
                    for block in model.layers.values()]
    cache.batch = batch
