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
class JobConfig:
    model: Model = field(default_factory=Model)
