"""Entry point: torchtitan's trainer with NeoLLM's batch-size rule and one-line config errors.

``python -m neollm.train --job.config_file X.toml`` (what run_train.sh launches under torchrun).
The only change to torchtitan's Trainer is made before it starts: ``[training]
global_batch_size`` is the batch the run trains on, whatever the number of ranks, and
``local_batch_size`` is the largest micro-batch one rank runs. With 8 ranks and a global batch
of 64 each rank runs 8 sequences; with 1 rank it runs 64, in micro-batches of at most
``local_batch_size`` with gradient accumulation. So one TOML trains the same thing on 1 GPU and
on 8.

Production additions, all on torchtitan's own mechanisms (docs/running.md): the checkpoint
manager resumes only from a validated checkpoint and also saves RNG and loss-guard state
(neollm/faults.py); SIGTERM/SIGUSR1 save a checkpoint at the current step and exit; ``[guard]``
stops or skips a step on a NaN/inf or spiking loss; the metric logger also writes
``metrics.jsonl``, per-technique scalars and a progress/ETA line (neollm/monitor.py); wandb goes
offline by itself without an API key or network; types and ranges of every key are checked
(neollm/config_check.py).
"""

from __future__ import annotations

import os
import signal
import sys

from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer, main

from neollm.errors import ConfigError
from neollm.faults import BadLossError, LossGuard, NeoLLMCheckpointManager, RNGState
from neollm.loss import LossSettings
from neollm import monitor


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

        from neollm.config_check import check_ranges, check_types

        check_types(job_config)
        check_ranges(job_config)
        check_model_choice(job_config)
        fit_batch_to_ranks(job_config, int(os.environ.get("WORLD_SIZE", "1")))
        settings = loss_settings(job_config)
        guard = guard_from_config(job_config)
        monitor.prepare_wandb(job_config.metrics.enable_wandb)
        super().__init__(job_config)
        self.fused_loss = job_config.model.name == "neollm"
        for part in self.model_parts:
            part.loss_settings = settings
        self._install_fault_tolerance(guard)
        self._install_monitor()

    # ------------------------------------------------------------ fault tolerance

    def _install_fault_tolerance(self, guard: LossGuard) -> None:
        """Validating resume, RNG + guard state in checkpoints, the loss guard, SIGTERM flag."""
        self.checkpointer.__class__ = NeoLLMCheckpointManager
        self.checkpointer.states["rng"] = RNGState()
        self.checkpointer.states["loss_guard"] = guard
        self.loss_guard = guard
        self._step_losses: list = []
        self._stop_signal: int | None = None
        self.stopped_by_signal = False
        if guard.enabled:
            step_optimizers = self.optimizers.step

            def guarded_step(*args, **kwargs):
                if self._loss_is_good():
                    step_optimizers(*args, **kwargs)

            self.optimizers.step = guarded_step

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        self._sync_ddp_gradients_only_on_last_microbatch()
        loss = super().forward_backward_step(
            input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
        )
        self._step_losses.append(loss.detach())
        return loss

    def _sync_ddp_gradients_only_on_last_microbatch(self) -> None:
        """Under DDP, all-reduce gradients in the last micro-batch's backward only.

        DDP here sums the replicas' gradients (neollm.parallelize.apply_ddp). A sync after every
        micro-batch would sum the already-reduced gradients of the earlier ones again (by the
        number of replicas); syncing once, after the whole accumulation, sums each exactly once
        and sends a step's gradients once. FSDP2 reduce-scatters each micro-batch into its
        sharded gradient, which is correct, and is left alone."""
        from torch.distributed._composable.replicate import DDP

        last = len(self._step_losses) == self.gradient_accumulation_steps - 1
        for part in self.model_parts:
            if isinstance(part, DDP):
                part.set_requires_gradient_sync(last)

    def _global_step_loss(self) -> float:
        """This step's loss over all ranks (sum of local loss sums / global valid tokens)."""
        import torch
        from torchtitan.distributed import utils as dist_utils

        loss = torch.sum(torch.stack(self._step_losses))
        mesh = self.parallel_dims.get_optional_mesh("loss") if self.parallel_dims.dp_cp_enabled else None
        return dist_utils.dist_sum(loss, mesh)

    def _loss_is_good(self) -> bool:
        """Called in place of the optimizer step: True lets it run."""
        if self.parallel_dims.pp_enabled or not self._step_losses:
            return True  # pipeline stages don't all see the loss: no guard
        loss = self._global_step_loss()
        self._step_losses.clear()
        problem = self.loss_guard.check(self.step, loss)
        if problem is None:
            self.loss_guard.consecutive_skips = 0
            return True
        guard = self.loss_guard
        if guard.on_bad_loss == "skip":
            guard.consecutive_skips += 1
            if guard.consecutive_skips > guard.max_consecutive_skips:
                raise BadLossError(
                    f"training stopped at step {self.step}: {problem}, and {guard.consecutive_skips} "
                    f"steps in a row were bad ([guard] max_consecutive_skips {guard.max_consecutive_skips}); "
                    "resume from the last checkpoint with a lower [optimizer] lr or more warm-up"
                )
            logger.warning(f"[guard] skipped step {self.step}: {problem} (batch dropped, no optimizer step)")
            self.optimizers.zero_grad()
            return False
        raise BadLossError(
            f"training stopped at step {self.step}: {problem}; the last checkpoint is before this step. "
            'Lower [optimizer] lr, raise warm-up or set [guard] on_bad_loss = "skip"'
        )

    def train_step(self, data_iterator):
        if self.progress.start_time is None:  # first step of this process (after any resume)
            self.progress.start(self.step - 1)
        self._step_losses.clear()
        probes = []
        if self.monitor_gates and self.metrics_processor.should_log(self.step):
            probes = [monitor.OutputGateProbe(part) for part in self.model_parts]
        try:
            super().train_step(data_iterator)
        finally:
            gates = {}
            for probe in probes:
                gates.update(probe.close())
        self._after_step(gates)

    def _preemption_requested(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1 (agreed over ranks, so all stop at one step)."""
        flag = self._stop_signal is not None
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def should_continue_training(self) -> bool:
        if self.step > 0 and self._preemption_requested():
            path = self.checkpointer.save_now(self.step)
            self.stopped_by_signal = True
            if os.environ.get("RANK", "0") == "0":
                sig = signal.Signals(self._stop_signal).name if self._stop_signal else "a stop signal on another rank"
                print(
                    f"preempted ({sig}) after step {self.step}: checkpoint saved to {path}; "
                    "rerun the same command to resume",
                    file=sys.stderr, flush=True,
                )
            return False
        return super().should_continue_training()

    def _on_stop_signal(self, signum, frame) -> None:
        if self._stop_signal is None:
            logger.warning(f"Got {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting")
        self._stop_signal = signum

    def train(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_stop_signal)
        result = super().train()
        self._finished = True  # close() then waits for every rank before the process group goes
        return result

    def _wait_for_all_ranks(self) -> None:
        """After a finished run, let every rank reach the process group's destruction together.
        torchtitan keeps rank 0 alive 2 s longer after the last step, and each rank then closes its
        checkpointer and loggers at its own pace before destroying the process group; on gloo (CPU)
        a rank sometimes aborted in that teardown (SIGABRT after the last step), which torchrun
        reports as a failed run. Called at the end of ``close()``, so no rank destroys its process
        group while another still works. Only on the success path: after an error a barrier could
        wait for a rank that is gone."""
        import torch.distributed as dist

        if getattr(self, "_finished", False) and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
            global _LEAVE_WITHOUT_FINALIZING
            _LEAVE_WITHOUT_FINALIZING = "gloo" in str(dist.get_backend())

    # ------------------------------------------------------------ monitoring

    def _install_monitor(self) -> None:
        section = getattr(self.job_config, "monitor", None)
        jsonl = getattr(section, "jsonl", True)
        self.monitor_scalars = getattr(section, "technique_scalars", True) and self.fused_loss
        self.monitor_progress = getattr(section, "progress", True)
        self.monitor_gates = (self.monitor_scalars and not self.job_config.compile.enable
                              and not self.parallel_dims.pp_enabled)
        is_rank0 = os.environ.get("RANK", "0") == "0"
        path = os.path.join(self.job_config.job.dump_folder, "metrics.jsonl") if jsonl and is_rank0 else None
        self.metrics_processor.logger = monitor.RunLogger(self.metrics_processor.logger, path)
        self.progress = monitor.Progress(self.job_config.training.steps)

    def _after_step(self, gates: dict[str, float]) -> None:
        """At log steps: technique scalars (every rank gathers them) and the progress line."""
        if not self.metrics_processor.should_log(self.step):
            return
        if self.monitor_scalars and not self.parallel_dims.pp_enabled:
            scalars = dict(gates)
            for part in self.model_parts:
                scalars.update(monitor.technique_scalars(part))
            if scalars:
                self.metrics_processor.logger.log(scalars, self.step)
        if self.monitor_progress:
            logger.info(self.progress.line(self.step))

    def close(self) -> None:
        processor = getattr(self, "metrics_processor", None)
        if processor is not None and os.environ.get("RANK", "0") == "0":
            hint = monitor.wandb_sync_hint(processor.logger)
            if hint:
                print(f"wandb ran offline: upload with `{hint}`", file=sys.stderr, flush=True)
        super().close()
        self._wait_for_all_ranks()

    def post_dataloading_process(self, input_dict, labels):
        """Hand the labels to the model: NeoLLM computes its loss from the hidden states."""
        inputs, labels, extra_inputs, extra_kwargs = super().post_dataloading_process(input_dict, labels)
        if self.fused_loss:
            extra_inputs["labels"] = labels
        return inputs, labels, extra_inputs, extra_kwargs


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


_LEAVE_WITHOUT_FINALIZING = False
"""Set by a finished multi-rank gloo run (see ``leave_without_finalizing``)."""


def leave_without_finalizing() -> None:
    """End a finished multi-rank gloo run without interpreter finalization.

    ``destroy_process_group()`` (torchtitan's ``main``, after ``close()``) unregisters the groups
    but does not stop gloo's C++ threads nor close its TCP pairs while any object still references
    a group: on 2 CPU ranks (torch 2.13) ``gloo_tcp_loop`` and two ``pt_gloo_runloop`` threads are
    alive after it, after ``main`` returns and after ``gc.collect()`` (a bare gloo group's threads
    end only when its last reference goes). They are then torn down during interpreter
    finalization and C++ static destruction, in an order nobody controls, while the peer rank
    exits and closes its sockets: a rank now and then died there of SIGABRT (std::terminate) after
    "Process group destroyed" (about one CI run in four; its stderr was hidden by torchrun's
    ``--local-ranks-filter 0``). Everything the run writes is closed by
    then (checkpointer, loggers, process group), so flushing the streams and ``os._exit(0)`` skips
    only that teardown; errors and single-rank runs exit normally."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run() -> None:
    try:
        main(NeoLLMTrainer)
        if _LEAVE_WITHOUT_FINALIZING:
            leave_without_finalizing()
    except (ConfigError, FileNotFoundError) as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BadLossError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(3)


if __name__ == "__main__":
    run()
