"""Feed-forward block (``mlp_type``): a GLU MLP whose gate activation is SiLU (SwiGLU, the default) or PolyNorm
(NeoLLM), the classic two-layer GELU MLP, or a sparse mixture of SwiGLU experts (neollm/model/moe.py).

    out = W_down( drop( act(W_gate m) ⊙ (W_up m) ) ),   act = SiLU      (mlp_type "swiglu", Shazeer 2020)
                                                         act = PolyNorm  (mlp_type "polynorm", arXiv 2411.03884)

NeoLLM's MLP (sourced, Kitsunp/ml-cross-entropy docs/polynorm-cute.md): gate_proj -> PolyNorm (+dropout);
up_proj; product -> column multiplier -> down_proj. The column multiplier is the ``down`` projection's learnable
multiplier c (linear.py), and dropout on the product equals dropout on the PolyNorm output (same mask, the
product is elementwise). All three projections come from ``make_linear`` (roles gate, up, down), so CoLA,
SimpleNorm and learnable multipliers apply. Parameter names w1 (gate), w3 (up), w2 (down) as Llama's.
PolyNorm adds 4 parameters (6 with the exclusive variant); dropout adds none. ``NEOLLM_POLYNORM_IMPL`` = auto
(the default: on CUDA from Ampere on) or triton computes ``PolyNorm(gate) * up`` as one fused op
(neollm/kernels/polynorm_glu.py) when no dropout is active; torch keeps the unfused module below.
Parameters and state_dict are the same either way. The gate's and up's SimpleNorm (simplegpt) go into the
fused op too (``NEOLLM_POLYNORM_FOLD_SIMPLENORM``, default 1; 0 normalises them here first).

NeoLLM's exact MLP graph (Kitsunp/ml-cross-entropy @ ec32cad: docs/neollm-mlp-cute.md, mlp/reference.py
``neollm_mlp_reference``, benchmark/mlp_profile.py ``ReferenceLayer``):
X -> FAN (512 -> 510, bias) -> [cos | sin | passthrough] (544) -> gate (544 -> 1536) -> gate row multiplier;
up (544 -> 1536); exclusive PolyNorm(gate) -> dropout -> ⊙ up -> down column multiplier -> down -> down row
multiplier. Here: ``ffn_fan_ratio`` (fan.FFNFAN) in front of w1/w3, ``polynorm_exclusive`` with
``polynorm_exclusive_init`` 1e-4, ``learnable_multipliers`` (gate r, down c and r: linear.py). The graph has no
SimpleNorm; seed 001's card puts SimpleGPT "inside MLP projections" (``simplegpt_scope = "mlp"``), where each
SimpleNorm gain stands in for the multiplier at its place (linear.py).

mlp_type "mlp" (``GeluMLP``), the GPT-2 / original-Transformer FFN:

    out = W_down( drop( GELU(W_up m) ) ),   W_up: dim -> ffn_hidden_dim,  no biases (as the GLU variants)

GELU is the exact erf form (PyTorch's default, also CoLA's activation in linear.py); GPT-2's tanh approximation
differs from it by under 1e-3 and is not offered. It has 2 * dim * ffn_hidden_dim weights against the GLU's 3, so
a parameter- (and FLOP-) matched comparison with a GLU of hidden size H sets ffn_hidden_dim = 1.5 * H for "mlp"
(1536 -> 2304 at the 135M shape); the hidden size is not adjusted automatically. Both projections come from
``make_linear`` (roles ``up_act`` and ``down``): CoLA, SimpleNorm and learnable multipliers apply, the row
multiplier sitting on W_up (it feeds the activation, as the GLU's gate does) and on W_down, the column
multiplier on W_down's input. Parameter names w1 (up), w2 (down).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from neollm.kernels import polynorm_glu
from neollm.model.args import NeoLLMModelArgs
from neollm.model.fan import FFNFAN
from neollm.model.linear import Projection, init_linear, make_linear
from neollm.model.norms import PolyNorm


class MLP(nn.Module):
    def __init__(self, args: NeoLLMModelArgs) -> None:
        super().__init__()
        self.fan = FFNFAN(args.dim, args) if args.ffn_fan_ratio > 0 else None
        in_dim = args.dim if self.fan is None else self.fan.out_dim
        self.w1 = make_linear(in_dim, args.ffn_hidden_dim, args, role="gate")
        self.w3 = make_linear(in_dim, args.ffn_hidden_dim, args, role="up")
        self.w2 = make_linear(args.ffn_hidden_dim, args.dim, args, role="down")
        self.act = (PolyNorm(exclusive=args.polynorm_exclusive, exclusive_init=args.polynorm_exclusive_init)
                    if args.mlp_type == "polynorm" else None)
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else None

    def init_weights(self, init_std: float, out_std: float) -> None:
        if self.fan is not None:
            self.fan.init_weights(init_std)
        init_linear(self.w1, init_std)
        init_linear(self.w3, init_std)
        init_linear(self.w2, out_std)
        if self.act is not None:
            self.act.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fan is not None:
            x = self.fan(x)
        norms = self._simple_norms()
        gate = self.w1.core(x) if norms else self.w1(x)
        if self._fused_polynorm(gate):
            act = self.act
            if norms:
                up, gains = self.w3.core(x), (norms[0].weight, norms[1].weight, norms[0].eps)
            else:
                up, gains = self.w3(x), ()
            return self.w2(polynorm_glu.polynorm_glu_op(gate, up, act.weight, act.bias, act.exclusive_logits,
                                                        act.eps, act.proj_eps, True, *gains)[0])
        if norms:
            gate = norms[0](gate)
        gate = F.silu(gate) if self.act is None else self.act(gate)
        hidden = gate * self.w3(x)
        if self.dropout is not None:
            hidden = self.dropout(hidden)
        return self.w2(hidden)

    def _simple_norms(self) -> tuple[nn.RMSNorm, nn.RMSNorm] | tuple[()]:
        """The gate's and up's SimpleNorms when NEOLLM_POLYNORM_FOLD_SIMPLENORM=1 (the default) and both projections are
        exactly ``gain * RMSNorm(core(x))`` (SimpleGPT, no multipliers) with one eps: the fused op then
        applies them itself. Empty otherwise."""
        w1, w3 = self.w1, self.w3
        if self.act is None or not polynorm_glu.fold_simplenorm():
            return ()
        if not isinstance(w1, Projection) or not isinstance(w3, Projection):
            return ()
        plain = all(p.norm is not None and p.row is None and p.col is None for p in (w1, w3))
        if not plain or w1.norm.eps is None or w1.norm.eps != w3.norm.eps:
            return ()
        return w1.norm, w3.norm

    def _fused_polynorm(self, gate: torch.Tensor) -> bool:
        """PolyNorm(gate) * up as one fused op: mlp_type "polynorm", no dropout active (dropout sits on the
        PolyNorm output; in eval it is the identity) and NEOLLM_POLYNORM_IMPL resolving to the kernels
        (decided on the gate: up is the same kind of projection output; the op checks it too)."""
        return (self.act is not None and (self.dropout is None or not self.training)
                and polynorm_glu.uses_kernel(polynorm_glu.POLYNORM_IMPL, gate, gate))


SwiGLU = MLP  # the default configuration of MLP (name kept for existing imports)


class GeluMLP(nn.Module):
    """mlp_type "mlp": W_down(drop(GELU(W_up x))), see the module docstring."""

    def __init__(self, args: NeoLLMModelArgs) -> None:
        super().__init__()
        self.w1 = make_linear(args.dim, args.ffn_hidden_dim, args, role="up_act")
        self.w2 = make_linear(args.ffn_hidden_dim, args.dim, args, role="down")
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else None

    def init_weights(self, init_std: float, out_std: float) -> None:
        init_linear(self.w1, init_std)
        init_linear(self.w2, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.w1(x))
        if self.dropout is not None:
            hidden = self.dropout(hidden)
        return self.w2(hidden)


def build_mlp(args: NeoLLMModelArgs) -> nn.Module:
    """The FFN that ``args.mlp_type`` names (a MoE returns ``(out, aux_loss)`` from forward)."""
    if args.mlp_type == "mlp":
        return GeluMLP(args)
    if args.mlp_type == "moe":
        from neollm.model.moe import MoE

        return MoE(args)
    return MLP(args)
