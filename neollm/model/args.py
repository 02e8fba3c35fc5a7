"""NeoLLM model arguments: sizes plus one switch per technique, and the named flavors.

A flavor is a complete ``NeoLLMModelArgs``. With every switch off the model is the plain pre-norm
GQA transformer (RoPE, RMSNorm, SwiGLU, tied embeddings): the baseline every technique is
measured against. The layer pattern mixes full attention ("A") with the mixers of neollm.model.mixers
(Gated DeltaNet "D", GLA "G", RetNet "T", Mamba2 "M", ...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
from torchtitan.config import JobConfig
from torchtitan.protocols.model import BaseModelArgs

from neollm.errors import ConfigError
from neollm.model.flops import training_flops_per_token
from neollm.model.overrides import apply_overrides



def mixer_codes() -> dict[str, str]:
    """Layer-pattern code -> mixer name: "A" full attention, the rest neollm.model.mixers."""
    from neollm.model.mixers import MIXERS

    return {"A": "full attention", **{code: spec.name for code, spec in MIXERS.items()}}


MLP_TYPES = ("swiglu", "polynorm", "mlp", "moe")


class ModelConfigError(ConfigError):
    """A model setting that cannot work; the message names the setting and the fix."""


@dataclass
class NeoLLMModelArgs(BaseModelArgs):
    # sizes
    dim: int = 512
    n_layers: int = 12
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 64
    ffn_hidden_dim: int = 1536
    vocab_size: int = 64_402
    max_seq_len: int = 512
    norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    embedding_init_std: float = 0.0
    """Std of the token embeddings at init; 0 = ``init_std``. SimpleGPT's code (Ocram7/SimpleGPT) draws
    them N(0, 1), unit RMS like each SimpleNormed output, with an untied head: ``embedding_init_std=1.0``
    with ``tie_embeddings=false`` (a tied head would start with logits ~sqrt(dim) wide)."""

    # mixers: one character per layer, tiled over n_layers ("A" attention; others: neollm.model.mixers)
    layer_pattern: str = "A"
    gdn_num_heads: int = 4
    gdn_head_dim: int = 64
    gdn_expand_v: float = 2.0
    gdn_conv_size: int = 4
    gdn_backend: str = "auto"
    """"auto": fla Triton kernels on CUDA, the pure-PyTorch reference elsewhere; or "fla" / "torch".
    Applies to every fla-backed mixer (D, G, T, M). G (GLA) and T (RetNet) take their head count and
    key/value sizes from gdn_num_heads / gdn_head_dim / gdn_expand_v; M (Mamba2) its conv from gdn_conv_size."""
    gla_gate_low_rank_dim: int = 16
    """GLA ("G"): rank of the low-rank forget-gate projection (fla's gate_low_rank_dim)."""
    mamba2_expand: int = 2
    """Mamba2 ("M"): inner width = mamba2_expand * dim (fla's expand)."""
    mamba2_head_dim: int = 64
    """Mamba2 ("M"): channels per head P; heads = mamba2_expand * dim / mamba2_head_dim."""
    mamba2_state_size: int = 128
    """Mamba2 ("M"): SSM state size N per head (fla's state_size)."""
    # RWKV-6 ("R", neollm/model/mixers/rwkv6.py): heads and head size are n_heads / head_dim
    rwkv_proj_low_rank_dim: int = 32
    """Rank of RWKV-6's data-dependent token-shift LoRA (fla's proj_low_rank_dim)."""
    rwkv_gate_low_rank_dim: int = 64
    """Rank of RWKV-6's decay LoRA (fla's gate_low_rank_dim)."""
    rwkv_backend: str = "auto"
    """"auto": fla's chunk_rwkv6 on CUDA, the pure-PyTorch chunked reference elsewhere; or "fla" / "torch"."""
    # LSTM ("L") and Elman RNN ("N") baselines (neollm/model/mixers/rnn.py)
    rnn_hidden_dim: int = 0
    """Hidden size of the LSTM / RNN mixers; 0 = the largest multiple of 8 not exceeding an attention layer's params."""

    # ---- attention techniques (full-attention layers; neollm/model/attention*.py) ----------
    seednorm_qk: bool = False
    """SeeDNorm (arXiv 2510.22777) on q and k per head before RoPE (takes the QK-norm slot)."""
    qkv_norm: bool = False
    """HybridNorm's QKV-norm (arXiv 2503.04598): RMSNorm with gain on q, k, v per head."""
    mea: bool = False
    """MEA (arXiv 2601.19611): mix K and V across KV heads (init identity), then per-head GroupNorm."""
    momentum_gamma: float = 0.0
    """Momentum Attention (arXiv 2602.04902): q,k += gamma*(x_t - x_{t-1}) after RoPE; 0 = off."""
    momentum_first: str = "repeat"
    """Momentum's x_{-1} at t = 0: "zero" (the NeoLLM author's kernel: zero-padded, so x_0 -> (1+gamma) x_0)
    or "repeat" (x_{-1} := x_0, first velocity 0)."""
    affine_scaled_attention: bool = False
    """Affine-Scaled Attention (arXiv 2602.23057): O = alpha*SDPA + (1-alpha)*mean_{j<=i} v_j."""
    lucid: bool = False
    """LUCID (arXiv 2602.10410): attend over X = P^-1 V, P = causal exp key-key kernel (T x T solve)."""
    xsa: bool = False
    """Exclusive Self Attention (arXiv 2603.09078): remove each head output's component along own v."""
    directional_routing: bool = False
    """Directional routing (arXiv 2603.14923): router-weighted removal of head outputs along directions."""
    routing_directions: int = 4
    """Directions per head for directional_routing."""
    attention_output_gate: str = "none"
    """Gated Attention (arXiv 2505.06708, G1) on the SDPA output: "none", "elementwise" or "headwise"."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities while training (SDPA dropout_p); 0 = off."""

    # ---- projection, MLP and residual techniques (linear.py, mlp.py, block.py, norms.py) -----
    mlp_type: str = "swiglu"
    """FFN: "swiglu" (GLU, SiLU gate), "polynorm" (GLU, PolyNorm gate, arXiv 2411.03884), "mlp" (W2 GELU(W1 x)),
    "moe" (sparse top-k mixture of SwiGLU experts with a load-balancing loss; neollm/model/moe.py)."""
    polynorm_exclusive: bool = False
    """PolyNorm: strip the x^2 and x^3 branches of their part along the x branch (sigmoid-gated), renormalise."""
    polynorm_exclusive_init: float = 1e-4
    """polynorm_exclusive: the removed fraction sigmoid(logit) at init, in (0, 1); the NeoLLM author's 1e-4
    (logits logit(1e-4)); 0.5 gives logits 0 (our earlier reading)."""
    moe_num_experts: int = 8
    """mlp_type "moe": experts per MoE layer."""
    moe_top_k: int = 2
    """mlp_type "moe": experts each token is routed to."""
    moe_hidden_dim: int = 0
    """mlp_type "moe": hidden size of each SwiGLU expert; 0 = ffn_hidden_dim // moe_top_k (active FFN = dense)."""
    moe_aux_loss_coef: float = 0.01
    """mlp_type "moe": weight of the Switch load-balancing loss (arXiv 2101.03961) added to the training loss."""
    learnable_multipliers: bool = False
    """Learnable multipliers y = r*(W(c*x)): r on o/down/gate/fan projections, c on o/down (arXiv 2601.04890)."""
    simplegpt: bool = False
    """SimpleNorm: make_linear projections -> gamma*RMSNorm(Wx), and the pre-norm they replace dropped (2602.01212)."""
    simplegpt_scope: str = "all"
    """simplegpt's reach: "all" (every make_linear projection; attention and MLP pre-norms dropped) or "mlp"
    (only the FFN's gate/up/down, seed 001's "applied inside MLP projections"; attention keeps its pre-norm)."""
    cola_rank_ratio: float = 0.0
    """CoLA: every make_linear projection W -> B GELU(A x), rank int(in*ratio); 0 = off (arXiv 2502.10940)."""
    fan_ratio: float = 0.0
    """FANformer ATF: mixer input X -> [cos(XWp) | sin(XWp) | XWpbar+b], Dp = int(ratio*dim); 0 = off (2502.21309)."""
    ffn_fan_ratio: float = 0.0
    """FAN inside the FFN (the NeoLLM author's MLP): m -> [cos(P) | sin(P) | G] with [P | G] = W m + b, read by
    gate/up. Width F' = D + int(ratio*D), P = int(ratio*F'), W: D -> F' - P; 0.0625 at D=512: 512 -> 510, 544 wide."""
    fan_on_gdn: bool = False
    """Also feed the FAN features to the non-attention mixer layers (D, G, T, M; default: attention only)."""
    layernorm_scaling: bool = False
    """LNS: both pre-norm outputs of layer l (1-indexed) times the constant 1/sqrt(l) (arXiv 2502.05795)."""
    gpas: bool = False
    """GPAS: after each residual add h -> h - SiLU(g)*stopgrad(h), one g per layer, init 0 (arXiv 2506.22049)."""
    hybrid_norm: bool = False
    """HybridNorm FFN post-norm: RMSNorm on the block output (2503.04598); its QKV half is attention's switch."""
    gated_residual: bool = False
    """Residual adds x + sigmoid(gate)*branch, one gate[dim] per sublayer, init 0 (FANformer author's GatedResidual)."""
    dropout: float = 0.0
    """Dropout on each sublayer output before its residual add and on the MLP hidden; 0 = off."""

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived -------------------------------------------------------------------------
    def layer_types(self) -> list[str]:
        """The mixer code of each layer, in order (the pattern tiled over the depth)."""
        reps = self.n_layers // len(self.layer_pattern)
        return list(self.layer_pattern * reps)

    def validate(self) -> None:
        """Raise ModelConfigError for shapes that do not fit together."""
        def fail(msg: str) -> None:
            raise ModelConfigError(f"model args: {msg}")

        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden_dim",
                     "vocab_size", "max_seq_len", "gdn_num_heads", "gdn_head_dim", "gdn_conv_size",
                     "gla_gate_low_rank_dim", "mamba2_expand", "mamba2_head_dim", "mamba2_state_size"):
            if getattr(self, name) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            fail(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            fail(f"head_dim ({self.head_dim}) must be even for RoPE")
        codes = mixer_codes()
        if not self.layer_pattern or set(self.layer_pattern) - set(codes):
            known = ", ".join(f"{c} ({n})" for c, n in codes.items())
            fail(f"layer_pattern {self.layer_pattern!r} may only use the codes {known}")
        if len(self.layer_pattern) > self.n_layers or self.n_layers % len(self.layer_pattern):
            fail(f"layer_pattern {self.layer_pattern!r} (length {len(self.layer_pattern)}) must "
                 f"tile n_layers ({self.n_layers}) exactly")
        for name in ("rwkv_proj_low_rank_dim", "rwkv_gate_low_rank_dim"):
            if getattr(self, name) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        if self.rwkv_backend not in ("auto", "fla", "torch"):
            fail(f"rwkv_backend must be 'auto', 'fla' or 'torch', got {self.rwkv_backend!r}")
        if self.rnn_hidden_dim < 0:
            fail(f"rnn_hidden_dim must be >= 0 (0 = sized like an attention layer), got {self.rnn_hidden_dim}")
        if self.embedding_init_std < 0:
            fail(f"embedding_init_std must be >= 0 (0 = init_std), got {self.embedding_init_std}")
        if self.gdn_backend not in ("auto", "fla", "torch"):
            fail(f"gdn_backend must be 'auto', 'fla' or 'torch', got {self.gdn_backend!r}")
        gdn_v = self.gdn_head_dim * self.gdn_expand_v
        if gdn_v != int(gdn_v):
            fail(f"gdn_head_dim * gdn_expand_v must be an integer, got {gdn_v}")
        if "T" in self.layer_pattern and self.gdn_head_dim % 2:
            fail(f"RetNet layers (T) apply RoPE over gdn_head_dim, which must be even; got {self.gdn_head_dim}")
        if "M" in self.layer_pattern and (self.mamba2_expand * self.dim) % self.mamba2_head_dim:
            fail(f"Mamba2 layers (M) need mamba2_expand * dim ({self.mamba2_expand * self.dim}) to be a "
                 f"multiple of mamba2_head_dim ({self.mamba2_head_dim}); change mamba2_head_dim or mamba2_expand")
        # projection, MLP and residual techniques
        if self.mlp_type not in MLP_TYPES:
            fail(f"mlp_type must be one of {', '.join(map(repr, MLP_TYPES))}, got {self.mlp_type!r}")
        if self.polynorm_exclusive and self.mlp_type != "polynorm":
            fail("polynorm_exclusive needs mlp_type = 'polynorm'")
        if self.mlp_type == "moe":
            self._validate_moe(fail)
        if not 0.0 <= self.cola_rank_ratio <= 1.0:
            fail(f"cola_rank_ratio must be in [0, 1] (0 = off), got {self.cola_rank_ratio}")
        if self.cola_rank_ratio and int(self.dim * self.cola_rank_ratio) < 1:
            fail(f"cola_rank_ratio {self.cola_rank_ratio} gives a rank below 1; raise it or set 0 (off)")
        if not 0.0 <= self.fan_ratio < 0.5:
            fail(f"fan_ratio must be in [0, 0.5) (0 = off), got {self.fan_ratio}")
        if self.fan_ratio and int(self.fan_ratio * self.dim) < 1:
            fail(f"fan_ratio {self.fan_ratio} gives no periodic channel at dim {self.dim}; raise it or set 0")
        if not 0.0 <= self.ffn_fan_ratio < 0.5:
            fail(f"ffn_fan_ratio must be in [0, 0.5) (0 = off), got {self.ffn_fan_ratio}")
        if self.ffn_fan_ratio and self.mlp_type not in ("swiglu", "polynorm"):
            fail(f"ffn_fan_ratio needs a GLU FFN (mlp_type 'swiglu' or 'polynorm'), got {self.mlp_type!r}; "
                 "set ffn_fan_ratio = 0 or change mlp_type")
        if self.ffn_fan_ratio and int(self.ffn_fan_ratio * (self.dim + int(self.ffn_fan_ratio * self.dim))) < 1:
            fail(f"ffn_fan_ratio {self.ffn_fan_ratio} gives no periodic channel at dim {self.dim}; raise it or set 0")
        if self.simplegpt_scope not in ("all", "mlp"):
            fail(f"simplegpt_scope must be 'all' or 'mlp', got {self.simplegpt_scope!r}")
        if not 0.0 < self.polynorm_exclusive_init < 1.0:
            fail(f"polynorm_exclusive_init must be in (0, 1) (a sigmoid's value), got {self.polynorm_exclusive_init}")
        if self.fan_on_gdn and not self.fan_ratio:
            fail("fan_on_gdn needs fan_ratio > 0")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout}")
        # attention techniques
        if not 0.0 <= self.momentum_gamma < float("inf"):
            fail(f"momentum_gamma must be a finite number >= 0 (0 = off), got {self.momentum_gamma}")
        if self.momentum_first not in ("zero", "repeat"):
            fail(f"momentum_first must be 'zero' or 'repeat', got {self.momentum_first!r}")
        if not 1 <= self.routing_directions <= self.head_dim:
            fail(f"routing_directions must be in [1, head_dim={self.head_dim}], "
                 f"got {self.routing_directions}")
        if self.attention_output_gate not in ("none", "elementwise", "headwise"):
            fail("attention_output_gate must be 'none', 'elementwise' or 'headwise', "
                 f"got {self.attention_output_gate!r}")
        if not 0.0 <= self.attention_dropout < 1.0:
            fail(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")

    def moe_expert_hidden_dim(self) -> int:
        """Hidden size of one MoE expert: moe_hidden_dim, or ffn_hidden_dim // moe_top_k when 0."""
        return self.moe_hidden_dim or self.ffn_hidden_dim // self.moe_top_k

    def _validate_moe(self, fail) -> None:
        if self.moe_num_experts < 2:
            fail(f"moe_num_experts must be >= 2 (a mixture), got {self.moe_num_experts}")
        if not 1 <= self.moe_top_k <= self.moe_num_experts:
            fail(f"moe_top_k must be in [1, moe_num_experts={self.moe_num_experts}], got {self.moe_top_k}")
        if self.moe_hidden_dim < 0:
            fail(f"moe_hidden_dim must be >= 0 (0 = ffn_hidden_dim // moe_top_k), got {self.moe_hidden_dim}")
        if self.moe_expert_hidden_dim() < 1:
            fail(f"ffn_hidden_dim // moe_top_k = {self.ffn_hidden_dim} // {self.moe_top_k} is 0: "
                 "set moe_hidden_dim > 0 or lower moe_top_k")
        if not 0.0 <= self.moe_aux_loss_coef < float("inf"):
            fail(f"moe_aux_loss_coef must be a finite number >= 0 (0 = no balancing loss), "
                 f"got {self.moe_aux_loss_coef}")
        if self.simplegpt:
            fail("mlp_type 'moe' does not support simplegpt: the experts are not make_linear projections, so "
                 "no SimpleNorm would replace the MLP pre-norm that simplegpt drops; set simplegpt = false "
                 "or pick another mlp_type")
        if self.cola_rank_ratio:
            fail("mlp_type 'moe' does not support cola_rank_ratio: the experts stay dense (not CoLA); set "
                 "cola_rank_ratio = 0 or pick another mlp_type")

    # ---- torchtitan protocol ---------------------------------------------------------------
    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        """Take the run's [model] overrides, sequence length and vocabulary; check the tokenizer fits."""
        from neollm.tokenizer import tokenizer_vocab_size

        apply_overrides(self, getattr(job_config.model, "overrides", None))
        self.max_seq_len = job_config.training.seq_len
        override = getattr(job_config.model, "vocab_size", 0)
        if override < 0:
            raise ModelConfigError(f"[model] vocab_size must be >= 0 (0 = flavor's), got {override}")
        if override:
            self.vocab_size = override
        assets = Path(job_config.model.hf_assets_path)
        if (assets / "tokenizer.json").is_file():
            needed = tokenizer_vocab_size(assets)
            if needed > self.vocab_size:
                padded = -(-needed // 128) * 128
                raise ModelConfigError(
                    f"the tokenizer in {assets} has {needed:,} ids but flavor "
                    f"{job_config.model.flavor!r} has vocab_size {self.vocab_size:,}: set "
                    f"[model] vocab_size = {padded} (>= {needed}), or use a tokenizer of at most "
                    f"{self.vocab_size:,} tokens"
                )
            p64, p128 = -(-needed // 64) * 64, -(-needed // 128) * 128
            if self.vocab_size not in (needed, p64, p128) and not getattr(
                    job_config.model, "allow_vocab_mismatch", False):
                source = "[model] vocab_size" if override else f"flavor {job_config.model.flavor!r}'s"
                raise ModelConfigError(
                    f"vocab_size {self.vocab_size:,} ({source}) is larger than the tokenizer in "
                    f"{assets} needs ({needed:,} ids): set [model] vocab_size = {needed}, or "
                    f"{p64} / {p128} (padded to a multiple of 64 / 128 for faster matmuls), or set "
                    f"[model] allow_vocab_mismatch = true to keep {self.vocab_size - needed:,} "
                    f"unused embedding rows"
                )
        self.validate()

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """(parameter count, training FLOPs per token incl. attention, GDN and the tied head)."""
        nparams = sum(p.numel() for p in model.parameters())
        return nparams, training_flops_per_token(model, self, seq_len)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


# Seed 001's techniques (NeoLLM-135M card), as switches. The card names FAN without a ratio:
# seed 000's 0.125 is used on the attention input. Its PolyNorm-exclusivity fix is announced for a
# later run, so off. From the author's code and config (sources: docs/techniques.md, "Seed 001 against
# the author's code"): SimpleGPT only inside the MLP projections (the card's scope), a FAN map inside
# the FFN (fan_ratio_ffn 0.0625, the author's MLP graph at ml-cross-entropy ec32cad) and momentum
# zero-padded before t = 0 (the author's kernel). The flavor before these three readings:
# overrides simplegpt_scope=all ffn_fan_ratio=0 momentum_first=repeat.
SEED_001_TECHNIQUES: dict[str, object] = dict(
    seednorm_qk=True, mlp_type="polynorm", gpas=True, layernorm_scaling=True, fan_ratio=0.125,
    mea=True, lucid=True, affine_scaled_attention=True, xsa=True, directional_routing=True,
    routing_directions=4, attention_output_gate="elementwise", momentum_gamma=0.1,
    learnable_multipliers=True, simplegpt=True, simplegpt_scope="mlp", ffn_fan_ratio=0.0625,
    momentum_first="zero",
)
# Seed 000 (NeoLLM-110M hybrid card): FAN 0.125, PolyNorm MLP, LNS, GPAS on a 3:1 GDN pattern.
SEED_000_TECHNIQUES: dict[str, object] = dict(
    fan_ratio=0.125, mlp_type="polynorm", layernorm_scaling=True, gpas=True,
)
# Seed 002 (FANformer repository): FAN p = 0.15, CoLA rank in/4, HybridNorm (QKV-norm + FFN
# post-norm), gated residuals, SwiGLU, dropout 0.1.
SEED_002_TECHNIQUES: dict[str, object] = dict(
    fan_ratio=0.15, cola_rank_ratio=0.25, qkv_norm=True, hybrid_norm=True, gated_residual=True,
    dropout=0.1, attention_dropout=0.1,
)


def _flavors() -> dict[str, NeoLLMModelArgs]:
    qwen3_vocab = 151_680  # Qwen3's 151,669 ids padded to a multiple of 64
    shape_135m = dict(dim=512, n_layers=12, n_heads=8, n_kv_heads=4, head_dim=64,
                      ffn_hidden_dim=1536, vocab_size=64_402, max_seq_len=512)
    return {
        # Tiny: trains in seconds per step on a CPU; both mixers present; every switch off.
        "debug": NeoLLMModelArgs(
            dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden_dim=384,
            vocab_size=qwen3_vocab, max_seq_len=256, layer_pattern="DA",
            gdn_num_heads=2, gdn_head_dim=32, gdn_expand_v=2.0,
        ),
        # The baseline: seed 001's shape with every technique off (pre-norm GQA, RoPE, SwiGLU).
        "plain": NeoLLMModelArgs(**shape_135m),
        # Seed 001: NeoLLM-135M, all its techniques. Vocabulary: a 64,402-token trimmed Qwen3.
        "neollm_135m": NeoLLMModelArgs(**shape_135m, **SEED_001_TECHNIQUES),
        # Seed 000: Gated DeltaNet in layers 1-3, 5-7, 9-11; full attention in 4, 8, 12.
        "neollm_110m_hybrid": NeoLLMModelArgs(
            dim=512, n_layers=12, n_heads=8, n_kv_heads=2, head_dim=64, ffn_hidden_dim=1024,
            vocab_size=qwen3_vocab, max_seq_len=512, layer_pattern="DDDA",
            gdn_num_heads=4, gdn_head_dim=64, gdn_expand_v=2.0, **SEED_000_TECHNIQUES,
        ),
        # Seed 002: the FANformer author's training script (HybridFun.py) builds d 768 (its
        # README says 512, which 12 heads do not divide), 12 heads of 64, 6 KV heads, FFN 2048,
        # context 1024, SmolLM2's 49,152-token vocabulary.
        "fanformer_92m": NeoLLMModelArgs(
            dim=768, n_layers=12, n_heads=12, n_kv_heads=6, head_dim=64, ffn_hidden_dim=2048,
            vocab_size=49_152, max_seq_len=1024, **SEED_002_TECHNIQUES,
        ),
    }


FLAVORS: dict[str, NeoLLMModelArgs] = _flavors()
