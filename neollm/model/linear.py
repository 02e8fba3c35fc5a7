"""The one place projections are made, so projection-level techniques apply everywhere.

``make_linear(in, out, args, role=..., bias=False)`` returns a plain ``Linear`` (``nn.Linear`` with an
``init_weights(std)`` hook) when no projection technique touches ``role``; otherwise a ``Projection`` that
composes, in this order,

    y = r ⊙ SimpleNorm( core( c ⊙ x ) ),    core = W x (+ b)  or  CoLA: B GELU(A x) + b_B

Every module returned has ``init_weights(std)`` where ``std`` is the std a dense ``W`` would get (the
projection's output scale at init matches the dense layer it replaces, see CoLALinear). Roles used in the
code: q, k, v, o (attention), gate, up, down (GLU MLP), up_act (the plain MLP's up projection, which feeds GELU
directly), fan_p, fan_pbar (FAN features), attn_gate, attn_affine,
attn_router (attention logit projections); roles outside the multiplier lists get CoLA and SimpleNorm
(every projection, ``attn_affine`` excepted, see below) but no learnable multipliers. The Gated DeltaNet mixer
builds its own ``nn.Linear`` (fla's parameter names), so none of these techniques reach its projections.
Initialise through ``init_linear(module, std)``: torchao's float8 conversion swaps our ``Linear`` (an
``nn.Linear`` subclass) for a ``Float8Linear`` that has no ``init_weights``; multipliers and SimpleNorm stay
outside the (FP8) core, so its amax scaling sees the raw W.

Techniques (switches in NeoLLMModelArgs):

* ``cola_rank_ratio`` — CoLA (arXiv 2502.10940), see ``CoLALinear``.
* ``simplegpt`` — SimpleNorm (arXiv 2602.01212): Ψ(x) = γ ⊙ RMSNorm(W x), γ [out] init 1, RMS over the whole
  output vector (the paper's per-Linear formula; not per head), eps = args.norm_eps. The block drops the
  attention/MLP pre-norms when it is on. Interaction with the attention engineer's QK norms: q and k skip
  SimpleNorm when ``seednorm_qk`` or ``qkv_norm`` is on, v skips it when ``qkv_norm`` is on — those per-head
  norms (with gains) take the slot; normalising twice would only make γ redundant with their gains.
  ``attn_affine`` (affine-scaled attention's alpha logits) is exempt: it is zero-initialised so that the layer
  starts as plain attention, and RMSNorm of a zero vector has gradient γ/sqrt(eps) (it would jump to unit-RMS
  logits after one step); its logits pass through tanh, so reading the un-normalised stream stays bounded.
  The other attention logit projections (attn_gate, attn_router) are SimpleNormed like every projection.
  ``ffn_fan`` (the FAN map inside the FFN) is exempt too: the author's FAN linear has no norm (Kitsunp/
  ml-cross-entropy docs/neollm-mlp-cute.md @ ec32cad), and its cos/sin are not scale-invariant, so the block
  keeps the MLP pre-norm in front of it (block.py).
  ``simplegpt_scope`` = "all" (above) or "mlp": only the FFN's ``gate``/``up``/``down``/``up_act`` get SimpleNorm
  (seed 001's card: SimpleGPT "applied inside MLP projections"); attention projections stay plain and keep
  their pre-norm, so learnable multipliers and LNS act there.
  Cost: one RMS reduction per projection output (+γ [out] params).
* ``learnable_multipliers`` — Learnable Multipliers (arXiv 2601.04890): y = r ⊙ (W (c ⊙ x)), r [out] and c [in]
  init 1, not weight-decayed (the paper adds a *tiny* WD on multipliers against symmetry drift — an optimizer
  choice left to the trainer). Placement (so no multiplier sits next to a norm gain or duplicates another one
  through a forward-pass symmetry):
    - c (column) on ``down`` (sourced: NeoLLM's column multiplier on the PolyNorm⊙up product before down_proj)
      and on ``o`` (attention is linear in v per head, so c_o ≡ a row multiplier on v; c_o survives a v-norm);
    - r (row) on ``o`` and ``down`` (residual writes: no norm follows), on ``gate`` (feeds SiLU/PolyNorm, whose
      output changes with per-channel scale; PolyNorm has no per-channel gain), on ``up_act`` (the plain MLP's
      up projection feeds GELU, so it stands where the GLU's gate does) and on ``fan_p``/``fan_pbar``
      (r_p sets the frequency of each periodic feature);
    - none on q/k (next to QK-norm gains when those are on; only r_q ⊙ r_k would matter otherwise), none on
      the *columns* of q/k/v/gate/up/fan (their input is the pre-norm output, whose gain is that multiplier),
      no r on ``up`` (≡ c_down through the GLU product) and none on ``v`` (≡ c_o).
  A projection that gets SimpleNorm gets no multipliers: its γ is the row multiplier and RMSNorm(Wx) makes W's
  scale irrelevant; c on ``o`` / ``down`` inputs would be ≡ γ_v / γ_up. Projections without SimpleNorm keep
  theirs, so under ``simplegpt_scope = "mlp"`` the attention's o (r, c), FAN (r) multipliers act, and the
  author's MLP multipliers (gate row, down column, down row; ec32cad's ``benchmark/mlp_profile.py``) are
  carried by γ_gate, γ_up (≡ c_down through the GLU product) and γ_down: the same function class and count.
  With ``simplegpt`` off, this placement is the author's MLP graph exactly. Cost: one elementwise multiply per
  multiplier (foldable into W at export).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from neollm.model.norms import no_weight_decay

if TYPE_CHECKING:  # annotations only: args.py imports flops.py -> moe.py -> this module
    from neollm.model.args import NeoLLMModelArgs

__all__ = ["CoLALinear", "Linear", "Projection", "init_linear", "make_linear", "ROW_MULTIPLIER_ROLES",
           "COLUMN_MULTIPLIER_ROLES", "SIMPLENORM_EXEMPT_ROLES", "MLP_SIMPLENORM_ROLES"]

ROW_MULTIPLIER_ROLES = frozenset({"o", "down", "gate", "up_act", "fan_p", "fan_pbar"})
COLUMN_MULTIPLIER_ROLES = frozenset({"o", "down"})
SIMPLENORM_EXEMPT_ROLES = frozenset({"attn_affine", "ffn_fan"})
MLP_SIMPLENORM_ROLES = frozenset({"gate", "up", "down", "up_act"})  # simplegpt_scope "mlp"

_GELU_SECOND_MOMENT = 0.4252214826  # E[GELU(z)^2], z ~ N(0, 1) (erf GELU; numerical quadrature)


class Linear(nn.Linear):
    """nn.Linear with NeoLLM's init hook (normal(0, std) weights, zero bias, bias not weight-decayed)."""

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
            no_weight_decay(self.bias)


def init_linear(module: nn.Module, std: float) -> None:
    """``module.init_weights(std)``; for a bare ``nn.Linear`` (e.g. after torchao's float8 conversion swapped our
    ``Linear`` for a ``Float8Linear``, which drops the method) the same init done here: N(0, std), zero bias."""
    if hasattr(module, "init_weights"):
        module.init_weights(std)
        return
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
        no_weight_decay(module.bias)


class CoLALinear(nn.Module):
    """CoLA low-rank projection (arXiv 2502.10940): W x  ->  B σ(A x) + b, A [in -> r], B [r -> out].

    As the FANformer author's ``CoLA_Linear`` (seed 002 repo, model_architecture.py / HybridFun.py): σ = GELU
    (erf form), A without bias, B with bias; rank = int(in * cola_rank_ratio) (author: in // 4 -> ratio 0.25).
    (The CoLA paper's own default activation is SiLU; we follow the NeoLLM author's lineage.)
    Init (ours; the author uses xavier_uniform): A ~ N(0, 1/in) so A x has unit variance for a unit-RMS input
    (GELU works in its nonlinear range), B ~ N(0, std^2 * in / (r * E[GELU(z)^2])), b = 0: the output variance
    at init equals that of the dense N(0, std^2) layer it replaces (std^2 * in per unit-RMS input), so the
    GPT-2 residual-scaled ``out_std`` keeps its meaning. A and B are ``nn.Linear`` (FLOP counting and float8
    conversion see them). Params: r*(in + out) + out vs in*out (r = in/4: in=out=512 -> 131,584 vs 262,144).
    FLOPs: 2r(in + out) per token forward vs 2*in*out, plus one GELU over r.
    """

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = Linear(in_features, rank, bias=False)
        self.B = Linear(rank, out_features, bias=True)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.A.weight, mean=0.0, std=1.0 / math.sqrt(self.in_features))
        b_std = std * math.sqrt(self.in_features / (self.rank * _GELU_SECOND_MOMENT))
        nn.init.normal_(self.B.weight, mean=0.0, std=b_std)
        nn.init.zeros_(self.B.bias)
        no_weight_decay(self.B.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.B(F.gelu(self.A(x)))


class Projection(nn.Module):
    """A projection with its techniques: y = r ⊙ SimpleNorm(core(c ⊙ x)); see the module docstring."""

    def __init__(self, core: nn.Module, in_features: int, out_features: int, *, row: bool, column: bool,
                 simple_norm: bool, eps: float) -> None:
        super().__init__()
        self.core = core
        self.col = nn.Parameter(torch.empty(in_features)) if column else None
        self.norm = nn.RMSNorm(out_features, eps=eps) if simple_norm else None
        self.row = nn.Parameter(torch.empty(out_features)) if row else None

    def init_weights(self, std: float) -> None:
        init_linear(self.core, std)
        with torch.no_grad():
            for p in (self.col, self.row):
                if p is not None:
                    p.fill_(1.0)
        if self.norm is not None:
            self.norm.reset_parameters()
            no_weight_decay(self.norm.weight)
        no_weight_decay(self.col, self.row)

    def forward(self, x: Tensor) -> Tensor:
        if self.col is not None:
            x = x * self.col
        y = self.core(x)
        if self.norm is not None:
            y = self.norm(y)
        if self.row is not None:
            y = y * self.row
        return y


def _simple_norm_applies(role: str, args: NeoLLMModelArgs) -> bool:
    if not args.simplegpt or role in SIMPLENORM_EXEMPT_ROLES:
        return False
    if getattr(args, "simplegpt_scope", "all") == "mlp" and role not in MLP_SIMPLENORM_ROLES:
        return False
    qk_normed = getattr(args, "seednorm_qk", False) or getattr(args, "qkv_norm", False)
    if role in ("q", "k") and qk_normed:
        return False
    if role == "v" and getattr(args, "qkv_norm", False):
        return False
    return True


def make_linear(in_features: int, out_features: int, args: NeoLLMModelArgs, *, role: str,
                bias: bool = False) -> nn.Module:
    """A projection ``in_features -> out_features`` for ``role`` (q, k, v, o, gate, up, down, fan_p, ...)."""
    if args.cola_rank_ratio > 0:
        core: nn.Module = CoLALinear(in_features, out_features, max(1, int(in_features * args.cola_rank_ratio)))
    else:
        core = Linear(in_features, out_features, bias=bias)
    simple_norm = _simple_norm_applies(role, args)
    multipliers = args.learnable_multipliers and not simple_norm  # gamma is a SimpleNormed projection's r
    row = multipliers and role in ROW_MULTIPLIER_ROLES
    column = multipliers and role in COLUMN_MULTIPLIER_ROLES
    if not (row or column or simple_norm):
        return core
    return Projection(core, in_features, out_features, row=row, column=column, simple_norm=simple_norm,
                      eps=args.norm_eps)
