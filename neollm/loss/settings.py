"""The ``[loss]`` choices: which implementation, z-loss weight, chunk size (validated).

Kept apart from the implementations (neollm/loss/linear_ce.py) so that the config, the trainer's
checks and the tools can name the choices without importing the loss code.
"""

from __future__ import annotations

from dataclasses import dataclass

from neollm.errors import ConfigError

IGNORE_INDEX = -100
LOSS_IMPLS = ("auto", "cce", "fused", "chunked", "logits")


@dataclass(frozen=True)
class LossSettings:
    impl: str = "auto"
    z_loss: float = 0.0
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        if self.impl not in LOSS_IMPLS:
            raise ConfigError(f"[loss] impl must be one of {LOSS_IMPLS}, got {self.impl!r}")
        if self.z_loss < 0:
            raise ConfigError(f"[loss] z_loss must be >= 0, got {self.z_loss}")
        if self.chunk_size <= 0:
            raise ConfigError(f"[loss] chunk_size must be positive, got {self.chunk_size}")
