"""The run checks the trainer (neollm.train) and the preflight (neollm.preflight) both apply to a
parsed JobConfig: the data-parallel degree and NeoLLM's global-batch rule, the model flavor, and the
``[loss]`` / ``[guard]`` sections turned into validated settings. Kept out of the trainer's entry
module so that the preflight does not import the trainer.
"""

from __future__ import annotations

from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger

from neollm.errors import ConfigError
from neollm.faults import LossGuard
from neollm.loss.settings import LossSettings


def data_parallel_degree(job_config: JobConfig, world_size: int) -> int:
    """The number of ranks that see different data (replicate x shard), as torchtitan builds it."""
    p = job_config.parallelism
    other = p.tensor_parallel_degree * p.pipeline_parallel_degree * p.context_parallel_degree
    replicate = p.data_parallel_replicate_degree
    shard = p.data_parallel_shard_degree
    if shard == -1:
        if world_size % (replicate * other):
            raise ConfigError(
                f"{world_size} ranks cannot be split into data_parallel_replicate_degree {replicate} "
                f"x tensor/pipeline/context degrees {other}: change [parallelism]"
            )
        shard = world_size // (replicate * other)
    return replicate * shard


def fit_batch_to_ranks(job_config: JobConfig, world_size: int) -> None:
    """Set ``local_batch_size`` so that global = local x dp x accumulation steps, exactly."""
    training = job_config.training
    dp = data_parallel_degree(job_config, world_size)
    if training.local_batch_size <= 0:
        raise ConfigError(f"[training] local_batch_size must be positive, got {training.local_batch_size}")
    if training.global_batch_size < 0:  # torchtitan's meaning: no accumulation
        training.global_batch_size = training.local_batch_size * dp
        return
    if training.global_batch_size == 0 or training.global_batch_size % dp:
        raise ConfigError(
            f"[training] global_batch_size {training.global_batch_size} is not divisible by the "
            f"{dp} data-parallel ranks: choose a multiple of {dp} or another number of GPUs"
        )
    per_rank = training.global_batch_size // dp
    if training.local_batch_size > per_rank:
        logger.info(
            "local_batch_size %d > global_batch_size / ranks = %d: using %d",
            training.local_batch_size, per_rank, per_rank,
        )
        training.local_batch_size = per_rank
    if per_rank % training.local_batch_size:
        raise ConfigError(
            f"[training] local_batch_size {training.local_batch_size} does not divide the "
            f"{per_rank} sequences each of {dp} ranks runs per step (global_batch_size "
            f"{training.global_batch_size}): choose a divisor of {per_rank}"
        )


def check_model_choice(job_config: JobConfig) -> None:
    from neollm.model.args import FLAVORS

    if job_config.model.name == "neollm" and job_config.model.flavor not in FLAVORS:
        raise ConfigError(
            f"[model] flavor {job_config.model.flavor!r} is unknown: choose one of {sorted(FLAVORS)}"
        )


def loss_settings(job_config: JobConfig) -> LossSettings:
    """The run's ``[loss]`` section (neollm.config) as LossSettings (validated)."""
    section = getattr(job_config, "loss", None)
    if section is None:
        return LossSettings()
    return LossSettings(impl=section.impl, z_loss=section.z_loss, chunk_size=section.chunk_size)


def guard_from_config(job_config: JobConfig) -> LossGuard:
    """The run's ``[guard]`` section (neollm.config) as a LossGuard (validated)."""
    section = getattr(job_config, "guard", None)
    if section is None:
        return LossGuard()
    if section.on_bad_loss not in ("stop", "skip", "off"):
        raise ConfigError(
            f'[guard] on_bad_loss {section.on_bad_loss!r} is unknown: choose "stop", "skip" or "off"'
        )
    if section.max_loss_ratio < 0 or 0 < section.max_loss_ratio <= 1:
        raise ConfigError(
            f"[guard] max_loss_ratio {section.max_loss_ratio} must be 0 (off) or above 1 (e.g. 3.0)"
        )
    for key in ("window", "warmup_steps", "max_consecutive_skips"):
        if getattr(section, key) < (1 if key == "window" else 0):
            raise ConfigError(f"[guard] {key} {getattr(section, key)} must be positive")
    return LossGuard(section.on_bad_loss, section.max_loss_ratio, section.window,
                     section.warmup_steps, section.max_consecutive_skips)
