"""FAN features for the mixer input: FANformer's ATF (arXiv 2502.21309), built on FAN (arXiv 2410.02675).

Formula (FANformer): X_F = FAN'(X) = [ cos(X W_p) || sin(X W_p) || X W_pbar + B_pbar ],
W_p [D -> D_p] (no bias), W_pbar [D -> D - 2 D_p] (with bias), D_p = int(fan_ratio * D), so X_F keeps width D
(0.125 at D=512 -> 64 cos + 64 sin + 384 linear; 0.15 -> 76 + 76 + 360). The attention layer's ordinary
q/k/v projections then read X_F instead of the normalised input X ("ATtention-Fourier": attention over X_F).

Placement (block.py): X = (LNS *) RMSNorm(h), X_F = FAN'(X), mixer(X_F). By default only full-attention layers
get FAN (the FANformer paper defines ATF for attention). Seed 000 (the NeoLLM-110M hybrid card) lists
"FANformer integration ... fan_ratio 0.125" for the whole model without saying whether its Gated DeltaNet
layers use it; our reading is attention-only (the ATF definition), and ``fan_on_gdn`` feeds X_F to the GDN
layers too for the other reading. Note: the FANformer author's own earlier repo (seed 002, ``CoLA_FAN``) puts
the FAN map *inside* each of Wq/Wk/Wv (each projection's output is [cos||sin||linear]); we follow the paper's
X_F -> Wq/Wk/Wv form that the brief and spec §13 specify.

The two projections come from ``make_linear`` (roles ``fan_p``, ``fan_pbar``), so CoLA makes them low-rank as
the author's CoLA_FAN does, SimpleNorm normalises them and learnable multipliers put a row multiplier on each
(r_p = per-feature frequency). Init: N(0, init_std) weights, zero bias (the spec notes the author used xavier).
Params per layer at D=512: D*D_p + D*(D-2D_p) + (D-2D_p) = 512*64 + 512*384 + 384 = 229,760 (ratio 0.125);
512*76 + 512*360 + 360 = 223,592 (0.15); bias not weight-decayed. Cost: one D x (D - D_p) GEMM per token
and 2*D_p sin/cos.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from neollm.model.args import NeoLLMModelArgs
from neollm.model.linear import init_linear, make_linear

__all__ = ["FAN", "fan_dims"]


def fan_dims(dim: int, ratio: float) -> tuple[int, int]:
    """(D_p, D - 2 D_p): the periodic width (used twice, cos and sin) and the linear width."""
    p_dim = int(ratio * dim)
    return p_dim, dim - 2 * p_dim


class FAN(nn.Module):
    """X [.., D] -> [cos(X W_p) || sin(X W_p) || X W_pbar + b] [.., D]."""

    def __init__(self, dim: int, args: NeoLLMModelArgs) -> None:
        super().__init__()
        self.p_dim, self.linear_dim = fan_dims(dim, args.fan_ratio)
        self.wp = make_linear(dim, self.p_dim, args, role="fan_p", bias=False)
        self.wpbar = make_linear(dim, self.linear_dim, args, role="fan_pbar", bias=True)

    def init_weights(self, std: float) -> None:
        init_linear(self.wp, std)
        init_linear(self.wpbar, std)

    def forward(self, x: Tensor) -> Tensor:
        p = self.wp(x)
        return torch.cat([torch.cos(p), torch.sin(p), self.wpbar(x)], dim=-1)

    def extra_repr(self) -> str:
        return f"periodic={self.p_dim} (cos) + {self.p_dim} (sin), linear={self.linear_dim}"
