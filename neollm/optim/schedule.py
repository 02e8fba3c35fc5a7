"""``build_lr_schedulers_fn`` of the neollm TrainSpec: warm-up from a start LR, then decay.

With ``[lr_scheduler] start_lr_factor`` unset (the default) this is torchtitan's own
``build_lr_schedulers``, unchanged. When it is set, the LR multiplier after ``c`` completed
optimizer steps (training step ``c + 1`` runs with it) is, with W = warmup_steps,
T = total_steps (default training.steps), D = decay steps (T - W, or round(T * decay_ratio) for
a warmup-stable-decay schedule), s0 = start_lr_factor and m = min_lr_factor::

    c <  W:           s0 + (1 - s0) * c / W          (step 1 runs at s0 * lr; step W + 1 at lr)
    W <= c < T - D:   1                               (stable phase, only with decay_ratio)
    c >= T - D:       m + (1 - m) * d(min((c - (T - D)) / D, 1))
        d(p) = 0.5 (1 + cos(pi p)) for "cosine", 1 - p for "linear", 1 - sqrt(p) for "sqrt"

so the multiplier reaches m at c = T. s0 = 0 gives the usual warm-up from 0 (Hugging Face's
``get_cosine_schedule_with_warmup``). Seed 000: lr 6e-4, start_lr_factor 0.5, warmup 5000,
min_lr_factor 0.1: 3e-4 -> 6e-4 at step 5000 -> cosine to 6e-5.

Both are a ``LRSchedulersContainer`` of ``LambdaLR``s, so checkpoints restore them.
"""

from __future__ import annotations

import functools
import math

from torchtitan.components.lr_scheduler import LRSchedulersContainer, build_lr_schedulers
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.tools.logging import logger

from neollm.errors import ConfigError


def warmup_decay_factor(
    step: int, *, warmup_steps: int, total_steps: int, decay_steps: int,
    start_factor: float, min_factor: float, decay_type: str,
) -> float:
    """LR multiplier after ``step`` completed optimizer steps (see the module docstring)."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps <= 0:
        return 1.0
    progress = min((step - decay_start) / decay_steps, 1.0)
    if decay_type == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay_type == "linear":
        decay = 1.0 - progress
    elif decay_type == "sqrt":
        decay = 1.0 - math.sqrt(progress)
    else:
        raise ConfigError(f"[lr_scheduler] decay_type {decay_type!r}: choose linear, sqrt or cosine")
    return min_factor + (1.0 - min_factor) * decay


def build_neollm_lr_schedulers(
    optimizers: OptimizersContainer, lr_scheduler_config, training_steps: int
) -> LRSchedulersContainer:
    start_factor = getattr(lr_scheduler_config, "start_lr_factor", None)
    if start_factor is None:
        return build_lr_schedulers(optimizers, lr_scheduler_config, training_steps)
    if not 0.0 <= start_factor <= 1.0:
        raise ConfigError(f"[lr_scheduler] start_lr_factor {start_factor} must be in [0, 1]")
    total = lr_scheduler_config.total_steps if lr_scheduler_config.total_steps is not None else training_steps
    warmup = int(lr_scheduler_config.warmup_steps)
    if warmup < 0:
        raise ConfigError(f"[lr_scheduler] warmup_steps {warmup} must be >= 0")
    if warmup > total:
        logger.warning("Warmup steps (%d) exceed total steps (%d): using %d", warmup, total, total)
        warmup = total
    if lr_scheduler_config.decay_ratio is not None:
        decay = min(round(total * lr_scheduler_config.decay_ratio), total - warmup)
    else:
        decay = total - warmup
    decay_type = lr_scheduler_config.decay_type
    if decay_type not in ("linear", "sqrt", "cosine"):
        raise ConfigError(f"[lr_scheduler] decay_type {decay_type!r}: choose linear, sqrt or cosine")
    lr_lambda = functools.partial(
        warmup_decay_factor, warmup_steps=warmup, total_steps=total, decay_steps=decay,
        start_factor=float(start_factor), min_factor=float(lr_scheduler_config.min_lr_factor),
        decay_type=decay_type,
    )
    return LRSchedulersContainer(optimizers, lr_lambda)
