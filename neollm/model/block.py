"""One decoder block: a mixer sublayer (attention or a neollm.model.mixers mixer) and an MLP sublayer, and the residual scheme.

With every switch off it is the plain pre-norm block ``h = x + mixer(norm(x)); out = h + mlp(norm(h))``.
The switches of the "projection, MLP and residual" section add, for layer l = layer_id + 1:

    a   = s_l * N_mix(x)                 N_mix = RMSNorm (Identity for attention under simplegpt), s_l LNS
    a   = FAN'(a)                        fan_ratio > 0, attention layers (and GDN layers with fan_on_gdn)
    h   = x ⊕ drop(mixer(a))             ⊕: plain add, or x + sigmoid(g_mix) ⊙ branch (gated_residual)
    h   = GPAS(h)                        gpas: h - SiLU(g) * stopgrad(h), one g shared by both sublayers
    f   = mlp(s_l * N_mlp(h))            N_mlp = RMSNorm (Identity under simplegpt); mlp_type, dropout inside
    out = GPAS(h ⊕ drop(f))              pre-norm FFN (default), or with hybrid_norm:
    out = RMSNorm_post(GPAS(h) ⊕ drop(f))   HybridNorm's FFN post-norm on the block output; GPAS moves to the
                                         skip path as in the official ``deeppost_gpas`` (after a norm it would
                                         be a forward no-op)

Techniques (paper, what and why; per-layer parameters at D = 512):
* LNS, arXiv 2502.05795 (``layernorm_scaling``): the constant s_l = 1/sqrt(l) on both pre-norm outputs, all
  layer types (norms.lns_scale). No params. Where SimpleNorm'd projections read the sublayer input it scales
  that input, which their SimpleNorm cancels (exactly up to eps, except through CoLA's GELU); it acts through
  everything else: the attention under ``simplegpt_scope = "mlp"`` and the FFN's FAN (``ffn_fan_ratio``).
* GPAS, arXiv 2506.22049 (``gpas``): norms.GPAS. 1 param.
* HybridNorm FFN post-norm, arXiv 2503.04598 (``hybrid_norm``): as the FANformer author's block (spec §14) the
  FFN keeps its pre-norm and the block output gets RMSNorm_post (gain init 1). The QKV-norm half is attention's
  ``qkv_norm``. D params.
* Gated residual (``gated_residual``): norms.GatedResidual on both adds; gates start at sigmoid(0) = 0.5. 2D.
* Dropout (``dropout``, FANformer's 0.1): on each sublayer output before its residual add and on the MLP
  hidden (mlp.py). A constant rate; the author's progressive rate p(1 + 0.04 log_3.9(l + 1)) is not implemented
  (a <1% change for 12 layers). No params.
* SimpleGPT, arXiv 2602.01212 (``simplegpt``): the norms live in the projections (linear.py), so the block drops
  the pre-norm of the MLP and, with ``simplegpt_scope = "all"``, of attention mixers ("mlp": attention keeps
  it). The MLP keeps its pre-norm when ``ffn_fan_ratio`` puts a FAN map (not SimpleNormed) in front of gate/up. Gated DeltaNet keeps its pre-norm: its projections are
  fla-named ``nn.Linear`` outside make_linear (no SimpleNorm), and its beta/decay gates need a bounded input.
* FAN/ATF, arXiv 2502.21309 (``fan_ratio``, ``fan_on_gdn``): fan.FAN between the pre-norm and the mixer.
* PolyNorm MLP, plain GELU MLP, CoLA, learnable multipliers: mlp.py / linear.py; MoE FFN: moe.py.
The final RMSNorm and the embedding are model.py's (no model-level wiring is needed for these switches).
"""

from __future__ import annotations

from collections.abc import Callable

import math

import torch
import torch.nn as nn

from neollm.model.args import NeoLLMModelArgs
from neollm.model.attention import Attention
from neollm.model.fan import FAN
from neollm.model.mixers import build_mixer
from neollm.model.mlp import build_mlp
from neollm.model.norms import GPAS, GatedResidual, lns_scale, no_weight_decay


def _rmsnorm(args: NeoLLMModelArgs, enabled: bool = True) -> nn.Module:
    return nn.RMSNorm(args.dim, eps=args.norm_eps) if enabled else nn.Identity()


def _reset_norm(norm: nn.Module | None) -> None:
    if isinstance(norm, nn.RMSNorm):
        norm.reset_parameters()
        no_weight_decay(norm.weight)


class Block(nn.Module):
    def __init__(self, layer_id: int, mixer_code: str, args: NeoLLMModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.mixer_code = mixer_code
        attention = mixer_code == "A"
        self.mixer_norm = _rmsnorm(args, enabled=not (args.simplegpt and attention and args.simplegpt_scope == "all"))
        self.fan = FAN(args.dim, args) if args.fan_ratio > 0 and (attention or args.fan_on_gdn) else None
        if attention:
            self.mixer: nn.Module = Attention(args)
        else:
            self.mixer = build_mixer(mixer_code, args, layer_id)
        # The FFN's FAN map is not SimpleNormed and its cos/sin need a bounded input: it keeps the pre-norm.
        self.mlp_norm = _rmsnorm(args, enabled=not (args.simplegpt and not args.ffn_fan_ratio))
        self.mlp = build_mlp(args)
        self.moe = args.mlp_type == "moe"  # its mlp returns (out, aux_loss)
        self.post_norm = _rmsnorm(args) if args.hybrid_norm else None
        self.gpas = GPAS() if args.gpas else None
        self.mixer_gate = GatedResidual(args.dim) if args.gated_residual else None
        self.mlp_gate = GatedResidual(args.dim) if args.gated_residual else None
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else None
        # LNS's constant as a one-element fp32 buffer (not saved: init_weights fills it), not a Python float: a
        # float attribute is a constant dynamo guards on, so layer 0 (s = 1) compiled a graph of its own and the
        # other layers a second one; as a tensor every block of a kind shares one compiled graph. Shape (1,), not
        # 0-d: dynamo reads a 0-d buffer as a Python scalar (.item()), specialises it and restarts the trace.
        self.register_buffer("lns", torch.full((1,), lns_scale(layer_id), dtype=torch.float32)
                             if args.layernorm_scaling else None, persistent=False)
        # GPT-2 style: residual-branch outputs start smaller so the stream's variance stays ~1.
        self._init_std = args.init_std
        self._out_std = args.init_std / math.sqrt(2 * args.n_layers)

    def init_buffers(self) -> None:
        """LNS's constant, exact, in fp32 (fp64 in an fp64 model): after ``to_empty`` (meta init), a cast, or a
        loader that leaves non-persistent buffers uninitialised (transformers'). A bf16 model thus still
        computes the product in fp32 and rounds once, as with the Python float the buffer replaced."""
        if self.lns is not None:
            dtype = torch.float64 if self.lns.dtype == torch.float64 else torch.float32
            self.lns = torch.full((1,), lns_scale(self.layer_id), dtype=dtype, device=self.lns.device)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.init_buffers()
        return self

    def init_weights(self) -> None:
        self.init_buffers()
        _reset_norm(self.mixer_norm)
        _reset_norm(self.mlp_norm)
        _reset_norm(self.post_norm)
        if self.fan is not None:
            self.fan.init_weights(self._init_std)
        self.mixer.init_weights(self._init_std, self._out_std)
        self.mlp.init_weights(self._init_std, self._out_std)
        for module in (self.gpas, self.mixer_gate, self.mlp_gate):
            if module is not None:
                module.init_weights()

    def _lns(self, normed: torch.Tensor) -> torch.Tensor:
        """``s_l * normed`` in the buffer's precision, rounded once to normed's dtype, as the product with a
        Python float is (a bf16 activation times the fp32 buffer would first round s_l to bf16)."""
        if self.lns is None:
            return normed
        if normed.dtype == self.lns.dtype:
            return normed * self.lns
        return (normed.to(self.lns.dtype) * self.lns).to(normed.dtype)

    def _add(self, x: torch.Tensor, branch: torch.Tensor, gate: GatedResidual | None) -> torch.Tensor:
        if self.dropout is not None:
            branch = self.dropout(branch)
        return x + branch if gate is None else gate(x, branch)

    def forward(self, x: torch.Tensor, rope: torch.Tensor,
                mixer: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                return_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``mixer`` replaces the token mixer's call (neollm.inference's decode steps pass
        ``block.mixer.step`` bound to the layer's state); None in training.

        ``return_aux``: return ``(out, aux)``, aux the MoE load-balancing loss (None without a MoE). It is
        returned rather than stored on a module so that it survives torch.compile and activation checkpointing.
        """
        normed = self._lns(self.mixer_norm(x))
        if self.fan is not None:
            normed = self.fan(normed)
        if mixer is not None:
            mixed = mixer(normed)
        else:
            mixed = self.mixer(normed, rope) if self.mixer_code == "A" else self.mixer(normed)
        h = self._add(x, mixed, self.mixer_gate)
        if self.gpas is not None:
            h = self.gpas(h)

        normed = self._lns(self.mlp_norm(h))
        aux = None
        out = self.mlp(normed)
        if self.moe:
            out, aux = out
        if self.post_norm is not None:
            skip = h if self.gpas is None else self.gpas(h)
            h = self.post_norm(self._add(skip, out, self.mlp_gate))
        else:
            h = self._add(h, out, self.mlp_gate)
            if self.gpas is not None:
                h = self.gpas(h)
        return (h, aux) if return_aux else h
