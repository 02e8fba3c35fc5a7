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
class Optimizer:
    """NeoLLM's keys in ``[optimizer]`` (torchtitan's name, lr, beta1, beta2, eps, weight_decay,
    implementation stay). ``name`` may be "AdamW", "Adam", "AdEMAMix" or "Conda"
    (neollm/optim). Weight decay applies only to matrices not flagged ``_no_weight_decay``."""

    beta3: float = 0.9999
    """AdEMAMix: slow-EMA coefficient (paper/official default 0.9999; seed 000 uses 0.999)."""

    alpha: float = 2.0
    """AdEMAMix: weight of the slow EMA in the update (official code default 2; seed 000: 5)."""

    t_alpha: int = 0
    """AdEMAMix: steps of linear alpha warm-up from 0 (0 = none; seed 000: 5000)."""

    t_beta3: int = 0
    """AdEMAMix: steps of beta3 warm-up from beta1, linear in half-life (0 = none; seed 000: 5000)."""

    conda_update_proj_gap: int = 500
    """Conda: recompute each matrix's SVD basis every this many steps (and at the first)."""

    conda_scale: float = 0.25
    """Conda: multiplier of the back-projected matrix update."""

    conda_correct_bias: bool = True
    """Conda: Adam bias correction lr * sqrt(1 - beta2^t) / (1 - beta1^t)."""


@dataclass
class LRScheduler:
    """NeoLLM's key in ``[lr_scheduler]`` (torchtitan's warmup_steps, total_steps, decay_ratio,
    decay_type, min_lr_factor stay)."""

    start_lr_factor: float | None = None
    """Warm up linearly from start_lr_factor x lr (the first step's LR) to lr over warmup_steps,
    then decay to min_lr_factor x lr at total_steps (neollm/optim/schedule.py). Unset: torchtitan's
    schedule unchanged (warm-up from lr / warmup_steps). Seed 000: 0.5 (3e-4 -> 6e-4)."""


@dataclass
class Data:
    """NeoLLM's data keys. The source itself is torchtitan's ``[training] dataset`` /
    ``dataset_path`` (and ``[validation] dataset`` / ``dataset_path``): see neollm/data."""

    max_doc_tokens_factor: int = 0
    """Truncate every document to max_doc_tokens_factor x seq_len tokens, its end-of-document
    token included (seed 000: 4). 0 keeps documents whole. Applies to every source (text read
    on the fly and pre-tokenized shards), in training and in validation (with that seq_len)."""


@dataclass
class JobConfig:
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    loss: Loss = field(default_factory=Loss)
    data: Data = field(default_factory=Data)
