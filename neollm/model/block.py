"""One decoder block: pre-norm mixer (attention or Gated DeltaNet) and pre-norm MLP."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from neollm.model.args import NeoLLMModelArgs
from neollm.model.attention import Attention
from neollm.model.deltanet import GatedDeltaNet
from neollm.model.mlp import SwiGLU


class Block(nn.Module):
    def __init__(self, layer_id: int, mixer_code: str, args: NeoLLMModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.mixer_code = mixer_code
        self.mixer_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        if mixer_code == "A":
            self.mixer: nn.Module = Attention(args)
        else:
            self.mixer = GatedDeltaNet(
                dim=args.dim, num_heads=args.gdn_num_heads, head_dim=args.gdn_head_dim,
                expand_v=args.gdn_expand_v, conv_size=args.gdn_conv_size, norm_eps=args.norm_eps,
                backend=args.gdn_backend, layer_idx=layer_id,
            )
        self.mlp_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.mlp = SwiGLU(args)
        # GPT-2 style: residual-branch outputs start smaller so the stream's variance stays ~1.
        self._init_std = args.init_std
        self._out_std = args.init_std / math.sqrt(2 * args.n_layers)

    def init_weights(self) -> None:
        self.mixer_norm.reset_parameters()
        self.mlp_norm.reset_parameters()
        self.mixer.init_weights(self._init_std, self._out_std)
        self.mlp.init_weights(self._init_std, self._out_std)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        normed = self.mixer_norm(x)
        mixed = self.mixer(normed, rope) if self.mixer_code == "A" else self.mixer(normed)
        h = x + mixed
        return h + self.mlp(self.mlp_norm(h))
