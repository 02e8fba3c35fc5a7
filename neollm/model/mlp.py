"""Feed-forward blocks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from neollm.model.args import NeoLLMModelArgs
from neollm.model.linear import make_linear


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) — the GLU MLP of Llama/Qwen (Shazeer 2020)."""

    def __init__(self, args: NeoLLMModelArgs) -> None:
        super().__init__()
        self.w1 = make_linear(args.dim, args.ffn_hidden_dim, args, role="gate")
        self.w3 = make_linear(args.dim, args.ffn_hidden_dim, args, role="up")
        self.w2 = make_linear(args.ffn_hidden_dim, args.dim, args, role="down")

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.w1.init_weights(init_std)
        self.w3.init_weights(init_std)
        self.w2.init_weights(out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
