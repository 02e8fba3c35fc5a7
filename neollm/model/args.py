"""NeoLLM model arguments: sizes plus one switch per technique, and the named flavors.

A flavor is a complete ``NeoLLMModelArgs``. With every switch off the model is the plain pre-norm
GQA transformer (RoPE, RMSNorm, SwiGLU, tied embeddings): the baseline every technique is
measured against. The layer pattern mixes full attention ("A") with Gated DeltaNet ("D").
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

MIXER_CODES = {"A": "full attention", "D": "Gated DeltaNet"}


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

    # mixers: one character per layer, tiled over n_layers ("A" attention, "D" Gated DeltaNet)
    layer_pattern: str = "A"
    gdn_num_heads: int = 4
    gdn_head_dim: int = 64
    gdn_expand_v: float = 2.0
    gdn_conv_size: int = 4
    gdn_backend: str = "auto"
    """"auto": fla Triton kernels on CUDA, the pure-PyTorch reference elsewhere; or "fla" / "torch"."""

    # ---- attention techniques (full-attention layers; neollm/model/attention*.py) ----------
    # (switches are added here with the modules that read them)

    # ---- projection, MLP and residual techniques (linear.py, mlp.py, block.py, norms.py) -----
    # (switches are added here with the modules that read them)

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
                     "vocab_size", "max_seq_len", "gdn_num_heads", "gdn_head_dim", "gdn_conv_size"):
            if getattr(self, name) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            fail(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            fail(f"head_dim ({self.head_dim}) must be even for RoPE")
        if not self.layer_pattern or set(self.layer_pattern) - set(MIXER_CODES):
            fail(f"layer_pattern {self.layer_pattern!r} may only use {sorted(MIXER_CODES)}")
        if len(self.layer_pattern) > self.n_layers or self.n_layers % len(self.layer_pattern):
            fail(f"layer_pattern {self.layer_pattern!r} (length {len(self.layer_pattern)}) must "
                 f"tile n_layers ({self.n_layers}) exactly")
        if self.gdn_backend not in ("auto", "fla", "torch"):
            fail(f"gdn_backend must be 'auto', 'fla' or 'torch', got {self.gdn_backend!r}")
        gdn_v = self.gdn_head_dim * self.gdn_expand_v
        if gdn_v != int(gdn_v):
            fail(f"gdn_head_dim * gdn_expand_v must be an integer, got {gdn_v}")

    # ---- torchtitan protocol ---------------------------------------------------------------
    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        """Take the run's sequence length and vocabulary; check the tokenizer fits."""
        from neollm.tokenizer import tokenizer_vocab_size

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
        self.validate()

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """(parameter count, training FLOPs per token incl. attention, GDN and the tied head)."""
        from neollm.model.flops import training_flops_per_token

        nparams = sum(p.numel() for p in model.parameters())
        return nparams, training_flops_per_token(model, self, seq_len)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _flavors() -> dict[str, NeoLLMModelArgs]:
    qwen3_vocab = 151_680  # Qwen3's 151,669 ids padded to a multiple of 64
    return {
        # Tiny: trains in seconds per step on a CPU; both mixers present.
        "debug": NeoLLMModelArgs(
            dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden_dim=384,
            vocab_size=qwen3_vocab, max_seq_len=256, layer_pattern="DA",
            gdn_num_heads=2, gdn_head_dim=32, gdn_expand_v=2.0,
        ),
        # Seed 001 shape (all-attention). Its 64,402-token vocabulary is a trimmed Qwen3 one.
        "neollm_135m": NeoLLMModelArgs(
            dim=512, n_layers=12, n_heads=8, n_kv_heads=4, head_dim=64, ffn_hidden_dim=1536,
            vocab_size=64_402, max_seq_len=512,
        ),
        # Seed 000 shape: Gated DeltaNet in layers 1-3, 5-7, 9-11; full attention in 4, 8, 12.
        "neollm_110m_hybrid": NeoLLMModelArgs(
            dim=512, n_layers=12, n_heads=8, n_kv_heads=2, head_dim=64, ffn_hidden_dim=1024,
            vocab_size=qwen3_vocab, max_seq_len=512, layer_pattern="DDDA",
            gdn_num_heads=4, gdn_head_dim=64, gdn_expand_v=2.0,
        ),
    }


FLAVORS: dict[str, NeoLLMModelArgs] = _flavors()
