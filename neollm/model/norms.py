"""Normalisation and residual-stream modules of the NeoLLM block: PolyNorm, GPAS, LNS, gated residual.

Each module documents its paper, formula, the reading we chose where the source leaves room, its extra
parameters and its cost. Every learnable tensor here is a gain/scalar/bias: ``init_weights`` (re)fills it and
flags it ``_no_weight_decay = True`` (flags are set there, not in ``__init__``, because ``to_empty`` and
FSDP's ``fully_shard`` replace the Parameter objects and drop Python attributes).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from neollm.kernels.polynorm_glu import polynorm_reference

__all__ = ["GPAS", "GatedResidual", "PolyNorm", "lns_scale", "no_weight_decay"]


def no_weight_decay(*params: nn.Parameter | None) -> None:
    """Flag parameters that an optimizer must not weight-decay (gains, multipliers, scalars, biases)."""
    for p in params:
        if p is not None:
            p._no_weight_decay = True


class PolyNorm(nn.Module):
    """PolyNorm, the third-order polynomial activation of PolyCom (arXiv 2411.03884, ICLR 2025).

    Formula (over the last dim, i.e. the MLP hidden F):
        norm(z)     = z * rsqrt(mean(z^2) + eps),  eps = 1e-6
        PolyNorm(x) = w0 * norm(x^3) + w1 * norm(x^2) + w2 * norm(x) + b
    NeoLLM uses it as the GLU gate: ``down(PolyNorm(gate(m)) * up(m))`` (Kitsunp/ml-cross-entropy
    docs/polynorm-cute.md). Math runs in fp32 (x^6 moments overflow bf16) and the result is cast back.

    Exclusive variant (``exclusive=True``), read from NeoLLM's own reference kernel
    (Kitsunp/ml-cross-entropy ``cut_cross_entropy/polynorm/reference.py``): with x1 = norm(x),
    x2 = norm(x^2), x3 = norm(x^3) and two logits e, (a2, a3) = sigmoid(e),
        xk' = norm(xk - ak * (<xk, x1> / max(<x1, x1>, 1e-6)) * x1)     for k = 2, 3,
    i.e. each higher-power branch loses (a fraction ak of) its component along the linear branch, then is
    renormalised; the combination uses x2', x3' in place of x2, x3. The model card (seed 001) gives the motive:
    "the quadratic branch has become partially redundant with the linear branch". Init: logits = logit(a0),
    a0 = ``exclusive_init``; the author's model layer starts at a0 = 1e-4 (``torch.logit(torch.full((2,), 1e-4))``
    in Kitsunp/ml-cross-entropy benchmark/mlp_profile.py @ ec32cad, "exclusive=True is the model default" in its
    docs/neollm-mlp-cute.md), i.e. as plain PolyNorm; a0 = 0.5 (logits 0) was our earlier reading.

    Parameters: weight[3] = 1/3, bias[1] = 0, (exclusive) logits[2]; none weight-decayed. 4 (6) per layer.
    Cost: x^2, x^3 and three row reductions over F (+2 dot products and 2 more reductions if exclusive),
    ~10-20 elementwise ops per element; eager autograd keeps ~3 F-sized fp32 activations (compile/AC recompute).
    """

    def __init__(self, eps: float = 1e-6, exclusive: bool = False, proj_eps: float = 1e-6,
                 exclusive_init: float = 1e-4) -> None:
        super().__init__()
        self.eps, self.proj_eps, self.exclusive = eps, proj_eps, exclusive
        self.exclusive_init = exclusive_init
        self.weight = nn.Parameter(torch.empty(3))
        self.bias = nn.Parameter(torch.empty(1))
        self.exclusive_logits = nn.Parameter(torch.empty(2)) if exclusive else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.weight.fill_(1.0 / 3.0)
        self.bias.zero_()
        if self.exclusive_logits is not None:
            self.exclusive_logits.fill_(math.log(self.exclusive_init / (1.0 - self.exclusive_init)))
        no_weight_decay(self.weight, self.bias, self.exclusive_logits)

    def forward(self, x: Tensor) -> Tensor:
        return polynorm_reference(x, self.weight, self.bias, self.exclusive_logits, self.eps, self.proj_eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, exclusive={self.exclusive}" + (
            f", exclusive_init={self.exclusive_init}" if self.exclusive else "")


class GPAS(nn.Module):
    """Gradient-Preserving Activation Scaling (arXiv 2506.22049, NeurIPS 2025).

    Formula: after a residual add h' = h + F(...):  h_out = h' - SiLU(g) * stopgrad(h').
    Forward value (1 - SiLU(g)) h' (shrinks the residual stream); backward d h_out / d h' = I (the detached copy
    carries no gradient), and dL/dg = -SiLU'(g) <dL/dh_out, h'>. As the official code (dandingsky/GPAS
    ``GPASBlock(gate_init_value=0.0, act_fn='silu')``) NeoLLM's block holds ONE GPAS per layer and applies it
    after both the mixer and the MLP residual adds (shared g). Starts as the identity (SiLU(0) = 0).

    Parameter: gate of shape [1] (a scalar; 1-element rather than 0-d so FSDP2 can shard/replicate it like
    any other parameter), init 0, not weight-decayed. Cost: one elementwise multiply-add; detach is free.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.empty(1))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.gate.zero_()
        no_weight_decay(self.gate)

    def forward(self, h: Tensor) -> Tensor:
        return h - F.silu(self.gate).to(h.dtype) * h.detach()


class GatedResidual(nn.Module):
    """Gated residual add of the FANformer author's HybridFun.py (``GatedResidual``), seed 002.

    Formula: out = x + sigmoid(gate) ⊙ branch, gate [dim] per sublayer, init 0, so each branch starts at half
    its plain weight (sigmoid(0) = 0.5) and can learn, per channel, to open (-> 1) or close (-> 0). The dropout
    of the author's class is applied by the block before calling this (one dropout site for all residual
    schemes). Parameters: dim per sublayer (2*dim per layer), not weight-decayed. Cost: one sigmoid of a
    [dim] vector and one multiply-add.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.empty(dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.gate.zero_()
        no_weight_decay(self.gate)

    def forward(self, x: Tensor, branch: Tensor) -> Tensor:
        return x + torch.sigmoid(self.gate).to(branch.dtype) * branch


def lns_scale(layer_id: int) -> float:
    """LayerNorm Scaling (arXiv 2502.05795, "The Curse of Depth"): the constant 1/sqrt(l), l = layer_id + 1.

    The block multiplies both pre-norm outputs of layer l by it (all layer types), so the output variance of
    deep pre-LN layers stops growing with depth: 1, 0.707, 0.577, ..., 0.289 for 12 layers. A fixed
    constant, not a parameter (the paper's constant form; the GPAS repo's 'lns' variant instead initialises
    the norm gain to this value); block.py holds it in a 0-d buffer so that all layers share one compiled
    graph. No parameters; one multiply (foldable into the norm gain at export).
    """
    return 1.0 / math.sqrt(layer_id + 1)
