"""NeoLLM's additions to torchtitan's JobConfig (merged by ``[job] custom_config_module``).

torchtitan merges these dataclasses field by field into its own, so ``[model] vocab_size``
sits beside torchtitan's ``[model]`` keys in the same TOML table.
"""

from dataclasses import dataclass, field


@dataclass
class Model:
    vocab_size: int = 0
    """Embedding rows. 0 keeps the flavor's size. It must cover the tokenizer's largest id;
    a size padded to a multiple of 64 or 128 keeps the tied head's matmul aligned."""


@dataclass
class Loss:
    impl: str = "auto"
    """"auto" (Cut Cross-Entropy on CUDA, chunked PyTorch elsewhere), "cce" or "chunked"."""

    z_loss: float = 0.0
    """Weight of the z-loss, z_loss * logsumexp(logits)^2 per token (0 = off)."""

    chunk_size: int = 4096
    """Tokens per logits chunk on the chunked path (peak memory: chunk_size x vocab fp32)."""


@dataclass
class JobConfig:
    model: Model = field(default_factory=Model)
    loss: Loss = field(default_factory=Loss)
