"""The one place projections are made, so projection-level techniques apply everywhere.

``make_linear`` returns a plain ``nn.Linear`` when no projection technique is on. Every module it
returns has ``init_weights(std)``.
"""

from __future__ import annotations

import torch.nn as nn

from neollm.model.args import NeoLLMModelArgs


class Linear(nn.Linear):
    """nn.Linear with NeoLLM's init hook (normal(0, std) weights, zero bias)."""

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def make_linear(in_features: int, out_features: int, args: NeoLLMModelArgs, *, role: str,
                bias: bool = False) -> nn.Module:
    """A projection ``in_features -> out_features`` for ``role`` (q, k, v, o, gate, up, down, ...)."""
    return Linear(in_features, out_features, bias=bias)
