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
FAN inside the FFN (``ffn_fan_ratio``, class ``FFNFAN``): the NeoLLM author's MLP graph (Kitsunp/ml-cross-entropy
@ ec32cad, docs/neollm-mlp-cute.md "Exact model graph", cut_cross_entropy/mlp/reference.py ``fan_reference``,
benchmark/mlp_profile.py ``ReferenceLayer``): ONE linear with bias, W: D -> F' - P, F' = D + int(r D),
P = int(r F'); its first P outputs become cos and sin, the rest pass through: [cos(P) | sin(P) | G], F' wide,
read by gate and up (D=512, r=0.0625: 512 -> 510, P=34, 544 wide; the author's config fan_ratio_ffn 0.0625).
Role ``ffn_fan``: no multipliers and no SimpleNorm (the author's graph has neither). Init N(0, init_std), zero
bias (the author's profile: N(0, 0.02)). Params per layer: 512*510 + 510 = 261,630, plus 2*32*1536 = 98,304 in
gate/up for their 544-wide input.

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

__all__ = ["FAN", "FFNFAN", "fan_dims", "ffn_fan_dims"]


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


def ffn_fan_dims(dim: int, ratio: float) -> tuple[int, int]:
    """(F', P): the FFN FAN's output width and its periodic width (the author's mlp_profile.py sizing)."""
    width = dim + int(dim * ratio)
    return width, int(width * ratio)


class FFNFAN(nn.Module):
    """m [.., D] -> [cos(P) | sin(P) | G] [.., F'] with [P | G] = W m + b (one projection); see the docstring."""

    def __init__(self, dim: int, args: NeoLLMModelArgs) -> None:
        super().__init__()
        self.out_dim, self.p_dim = ffn_fan_dims(dim, args.ffn_fan_ratio)
        self.proj = make_linear(dim, self.out_dim - self.p_dim, args, role="ffn_fan", bias=True)

    def init_weights(self, std: float) -> None:
        init_linear(self.proj, std)

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x)
        periodic = y[..., :self.p_dim]
        return torch.cat([torch.cos(periodic), torch.sin(periodic), y[..., self.p_dim:]], dim=-1)

    def extra_repr(self) -> str:
        return f"periodic={self.p_dim} (cos) + {self.p_dim} (sin), linear={self.out_dim - 2 * self.p_dim}"
