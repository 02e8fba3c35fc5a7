"""Entry point: torchtitan's trainer with NeoLLM's batch-size rule and one-line config errors.

``python -m neollm.train --job.config_file X.toml`` (what run_train.sh launches under torchrun).
The only change to torchtitan's Trainer is made before it starts: ``[training]
global_batch_size`` is the batch the run trains on, whatever the number of ranks, and
``local_batch_size`` is the largest micro-batch one rank runs. With 8 ranks and a global batch
of 64 each rank runs 8 sequences; with 1 rank it runs 64, in micro-batches of at most
``local_batch_size`` with gradient accumulation. So one TOML trains the same thing on 1 GPU and
on 8.
"""

from __future__ import annotations

import os
import sys

from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer, main

from neollm.errors import ConfigError
from neollm.loss import LossSettings


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


class NeoLLMTrainer(Trainer):
    def __init__(self, job_config: JobConfig) -> None:
        import neollm  # noqa: F401  (registers the spec and datasets, CPU patch)

        check_model_choice(job_config)
        fit_batch_to_ranks(job_config, int(os.environ.get("WORLD_SIZE", "1")))
        settings = loss_settings(job_config)
        super().__init__(job_config)
        self.fused_loss = job_config.model.name == "neollm"
        for part in self.model_parts:
            part.loss_settings = settings

    def post_dataloading_process(self, input_dict, labels):
        """Hand the labels to the model: NeoLLM computes its loss from the hidden states."""
        inputs, labels, extra_inputs, extra_kwargs = super().post_dataloading_process(input_dict, labels)
        if self.fused_loss:
            extra_inputs["labels"] = labels
        return inputs, labels, extra_inputs, extra_kwargs


def run() -> None:
    try:
        main(NeoLLMTrainer)
    except (ConfigError, FileNotFoundError) as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
