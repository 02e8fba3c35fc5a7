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
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer, main

from neollm.errors import ConfigError
from neollm.faults import BadLossError, LossGuard, NeoLLMCheckpointManager, PendingChecks, RNGState
from neollm import handover, monitor
from neollm.run_checks import check_model_choice, fit_batch_to_ranks, guard_from_config, loss_settings


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""torch.compile modes whose compiled graphs run as CUDA graphs (their outputs are overwritten by the next replay)."""


def zero_grads_in_place(parameters) -> None:
    """Zero every trainable parameter's gradient in place, creating zeros where there is none.

    For CUDA graphs ([compile] mode "reduce-overhead" or "max-autotune") with gradient accumulation:
    a gradient that autograd finds missing is taken as ``.grad`` without a copy, and under CUDA graphs
    it is a graph output that the next micro-batch's replay overwrites (H200, ``plain`` at micro-batch
    8 of 64: "accessing tensor output of CUDAGraphs that has been overwritten", at the tied
    embedding's gradient). Gradients that exist are accumulated into in place, so no graph output is kept."""
    import torch

    grads = []
    for p in parameters:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            grads.append(p.grad)
    if grads:
        torch._foreach_zero_(grads)


def same_layout(a, b) -> bool:
    """Equal strides in every dimension longer than 1 (a stride there means nothing), as autograd's
    layout rule for a gradient it keeps."""
    return all(x == y for x, y, n in zip(a.stride(), b.stride(), b.shape) if n > 1)


def accumulate_grads(params, grads) -> None:
    """``p.grad += g`` for every parameter that got a gradient, in one foreach add.

    Autograd's own accumulation launches one add kernel per parameter and micro-batch: for
    NeoLLM-135M at micro-batch 8 of 64 that is 3,952 small adds a step (~8.5 ms of GPU time and as
    many launches in the profile, BENCHMARKS.md twentieth session). A parameter without a
    gradient yet takes ``g`` itself where ``g`` is laid out like it, as autograd does (else a copy:
    e.g. the gradient of ``p.sum()`` is an expanded view, which cannot be added into in place);
    unused ones (``g`` None) keep theirs."""
    import torch

    targets, increments = [], []
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g if same_layout(g, p) else torch.empty_like(p).copy_(g)
        else:
            targets.append(p.grad)
            increments.append(g)
    if targets:
        torch._foreach_add_(targets, increments)


class NeoLLMTrainer(Trainer):
    def __init__(self, job_config: JobConfig) -> None:
        import neollm  # noqa: F401  (registers the spec and datasets, CPU patch)

        from neollm.config_check import apply_dataset_default_paths, check_ranges, check_types

        apply_dataset_default_paths(job_config, sys.argv[1:])
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
        mode = getattr(job_config.compile, "mode", "")
        self.grads_in_place = job_config.compile.enable and mode in CUDA_GRAPH_MODES
        if self.grads_in_place:
            logger.info(f"[compile] mode {mode}: gradients are zeroed in place, not dropped (CUDA graphs)")
        # One process, several micro-batches (or CUDA graphs, which zero in place and add every
        # micro-batch): gradients from autograd.grad, summed by one foreach add (accumulate_grads).
        # Data-parallel wrappers hook autograd's own accumulation, so they keep backward().
        self.foreach_accumulation = self.parallel_dims.world_size == 1 and (
            self.gradient_accumulation_steps > 1 or self.grads_in_place)
        # The parameters whose gradients it takes (a checkpoint loads into them in place, later)
        self._grad_params = [p for part in self.model_parts for p in part.parameters()
                             if p.requires_grad] if self.foreach_accumulation else []
        if self.foreach_accumulation:
            logger.info("one process: each micro-batch's gradients are added to .grad by one foreach add")

    # ------------------------------------------------------------ fault tolerance

    def _install_fault_tolerance(self, guard: LossGuard) -> None:
        """Validating resume, RNG + guard state in checkpoints, the loss guard, SIGTERM flag."""
        self.checkpointer.__class__ = NeoLLMCheckpointManager
        self.checkpointer.states["rng"] = RNGState()
        self.checkpointer.states["loss_guard"] = guard
        self.checkpointer.before_save = self._settle_loss_checks
        self.checkpointer.final_step = self.job_config.training.steps
        self.loss_guard = guard
        self.pending_checks = PendingChecks()
        self._step_losses: list = []
        self._stop_signal: int | None = None
        self.stopped_by_signal = False

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        self._sync_ddp_gradients_only_on_last_microbatch()
        if self.foreach_accumulation:
            loss = self._forward_backward_foreach(input_dict, labels, global_valid_tokens)
        else:
            loss = super().forward_backward_step(
                input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
            )
        # Under CUDA graphs (CUDA_GRAPH_MODES) the loss is a CUDA-graph output that the next
        # micro-batch's replay overwrites (H200, micro-batch 8 of 64: "accessing tensor output of
        # CUDAGraphs that has been overwritten"): keep a copy, one scalar kernel.
        loss = loss.detach().clone()
        self._step_losses.append(loss)
        return loss

    def _forward_backward_foreach(self, input_dict, labels, global_valid_tokens):
        """torchtitan 0.2.2's forward/backward (its non-pipeline branch) on one process, with the
        gradients taken by ``torch.autograd.grad`` and summed into ``.grad`` by accumulate_grads."""
        import torch

        inputs, labels, extra_inputs, extra_kwargs = self.post_dataloading_process(input_dict, labels)
        with self.train_context():
            with self.maybe_enable_amp:
                pred = self.model_parts[0](inputs, **extra_inputs, **extra_kwargs)
                loss = self.loss_fn(pred, labels) / global_valid_tokens
            del pred  # before the backward, as torchtitan does, for the memory peak
            grads = torch.autograd.grad(loss, self._grad_params, allow_unused=True)
        accumulate_grads(self._grad_params, grads)
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

    def _global_step_loss(self):
        """This step's loss over all ranks (sum of local loss sums / global valid tokens), as a
        device tensor: summed over the data-parallel ranks by an all-reduce, not read back."""
        import torch

        loss = torch.sum(torch.stack(self._step_losses)).detach()
        if self.parallel_dims.dp_cp_enabled:
            loss = device_sum(loss, self.parallel_dims.get_optional_mesh("loss"))
        return loss

    def _guard_step(self) -> bool:
        """The loss guard, before the optimizer step; False skips that step.

        The test runs on the device (LossGuard.check_tensor). "stop" (the default) does not wait
        for it: the verdict travels to the host by a non-blocking copy and is read when it has
        arrived (``_poll_loss_checks``, each step), and waited for only at log steps, before a
        checkpoint is saved and at the end, so a bad step stops the run, naming that step, a step
        or a few later, and no checkpoint is saved from that step on. "skip" must know before the
        optimizer step whether to run it, so it reads the verdict at once: one host sync per step
        (the price of an exact skip: no optimizer step at all, moments and step count unchanged)."""
        if not self.loss_guard.enabled or self.parallel_dims.pp_enabled or not self._step_losses:
            return True  # pipeline stages don't all see the loss: no guard
        record = self.loss_guard.check_tensor(self.step, self._global_step_loss())
        self._step_losses.clear()
        if self.loss_guard.on_bad_loss != "skip":
            self.pending_checks.add(self.step, record)
            return True
        problem = self.loss_guard.reason(record.tolist())
        guard = self.loss_guard
        if problem is None:
            guard.consecutive_skips = 0
            return True
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

    def _raise_on_bad(self, verdicts) -> None:
        for step, record in verdicts:
            problem = self.loss_guard.reason(record)
            if problem is not None:
                later = f" (seen at step {self.step})" if step != self.step else ""
                raise BadLossError(
                    f"training stopped at step {step}: {problem}{later}; the last checkpoint is "
                    'before this step. Lower [optimizer] lr, raise warm-up or set [guard] on_bad_loss = "skip"'
                )

    def _poll_loss_checks(self) -> None:
        """Read the verdicts that have reached the host (never waits)."""
        self._raise_on_bad(self.pending_checks.ready())

    def _settle_loss_checks(self) -> None:
        """Wait for every pending verdict (log steps, before a checkpoint, at the end)."""
        self._raise_on_bad(self.pending_checks.drain())

    def train_step(self, data_iterator):
        first_step = self.progress.start_time is None  # first step of this process (after any resume)
        if first_step:
            self.progress.start(self.step - 1)
        self._step_losses.clear()
        probes = []
        if self.monitor_gates and self.metrics_processor.should_log(self.step):
            probes = [monitor.OutputGateProbe(part) for part in self.model_parts]
        try:
            self._run_step(data_iterator)
        finally:
            gates = {}
            for probe in probes:
                gates.update(probe.close())
        self._after_step(gates)
        if first_step:
            self._collect_compile_garbage()

    def _collect_compile_garbage(self) -> None:
        """One garbage collection right after this process's first step. torchtitan turns automatic
        collection off and collects every ``[training] gc_freq`` steps; the first of those walks every
        object the first step's compile left behind (the later ones find next to nothing), a one-time
        pause that used to land in the log interval holding step ``gc_freq`` (BENCHMARKS.md, eighth
        and tenth sessions). Here it lands in the first step, which compiles anyway."""
        self.gc_handler.collect("Collecting the first step's compile garbage")

    def _zero_grads(self) -> None:
        """Drop the gradients, or under CUDA graphs (CUDA_GRAPH_MODES) zero them in place
        (zero_grads_in_place says why)."""
        if self.grads_in_place:
            zero_grads_in_place(p for part in self.model_parts for p in part.parameters())
        else:
            self.optimizers.zero_grad()

    def _run_step(self, data_iterator) -> None:
        """torchtitan 0.2.2's ``Trainer.train_step`` without its host syncs between log steps.

        The same work in the same order (micro-batches, valid-token count, forward/backward,
        clipping, optimizer and LR steps, logging), except: batches go to the device with
        ``non_blocking=True`` (from pinned memory with ``[training.dataloader] pin_memory``; a
        blocking copy waits for the device to finish the previous step), the global valid-token
        count and the loss guard's global loss stay device tensors (all-reduced, never read),
        the loss guard decides on the device (``_guard_step``), and loss / grad norm are read
        back at log steps only."""
        import torch
        from torchtitan.components.loss import IGNORE_INDEX

        self._zero_grads()
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        parallel_dims = self.parallel_dims

        microbatches = []
        local_valid_tokens = torch.tensor(0, dtype=torch.int64)
        for _ in range(self.gradient_accumulation_steps):
            input_dict, labels = next(data_iterator)
            local_valid_tokens += (labels != IGNORE_INDEX).sum()
            microbatches.append((input_dict, labels))

        local_valid_tokens = local_valid_tokens.to(self.device, non_blocking=True)
        if parallel_dims.dp_enabled:
            global_valid_tokens = device_sum(local_valid_tokens, parallel_dims.get_mesh("batch")).float()
        else:
            global_valid_tokens = local_valid_tokens.float()

        accumulated_losses = []
        for input_dict, labels in microbatches:
            for k, v in input_dict.items():
                if isinstance(v, torch.Tensor):
                    input_dict[k] = v.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            loss = self.forward_backward_step(
                input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
            )
            accumulated_losses.append(loss.detach())

        grad_norm = dist_utils.clip_grad_norm_(
            [p for m in self.model_parts for p in m.parameters()],
            self.job_config.training.max_norm,
            foreach=True,
            pp_mesh=parallel_dims.get_optional_mesh("pp"),
            ep_enabled=parallel_dims.ep_enabled,
        )
        self.checkpointer.maybe_wait_for_staging()
        if self._guard_step():
            self.optimizers.step()
        self.lr_schedulers.step()
        self._poll_loss_checks()

        if not self.metrics_processor.should_log(self.step):
            return
        self._settle_loss_checks()
        loss = torch.sum(torch.stack(accumulated_losses)).detach()
        if parallel_dims.dp_cp_enabled:
            loss_mesh = parallel_dims.get_optional_mesh("loss")
            local_avg_loss = loss * global_valid_tokens / local_valid_tokens
            global_avg_loss = dist_utils.dist_sum(loss, loss_mesh)
            global_max_loss = dist_utils.dist_max(local_avg_loss, loss_mesh)
            global_ntokens_seen = dist_utils.dist_sum(
                torch.tensor(self.ntokens_seen, dtype=torch.int64, device=self.device), loss_mesh)
        else:
            global_avg_loss = global_max_loss = loss.item()
            global_ntokens_seen = self.ntokens_seen
        self._warn_if_waiting_on_data()
        self.metrics_processor.log(
            self.step, global_avg_loss, global_max_loss, grad_norm.item(),
            extra_metrics={"n_tokens_seen": global_ntokens_seen, "lr": lr},
        )

    def _warn_if_waiting_on_data(self) -> None:
        """At a log step: warn when the steps since the last log spent more than ``[monitor]
        data_wait_warn`` of their wall time waiting for the dataloader (host time in ``next()``,
        as torchtitan's ``time_metrics/data_loading(%)``; no device sync). Without per-step syncs
        the host runs ahead of a busy GPU and finds batches ready; waiting shows the data is
        slower than the GPU. Repeated at most every 5 minutes."""
        import time

        processor = self.metrics_processor
        threshold = getattr(getattr(self.job_config, "monitor", None), "data_wait_warn", 0.05)
        elapsed = time.perf_counter() - processor.time_last_log
        waits = processor.data_loading_times
        if threshold <= 0 or not waits or elapsed <= 0:
            return
        share = sum(waits) / elapsed
        now = time.monotonic()
        if share <= threshold or now - getattr(self, "_data_warned_at", -1e9) < 300:
            return
        self._data_warned_at = now
        workers = self.job_config.training.dataloader.num_workers
        logger.warning(
            f"[data] steps {self.step - len(waits) // max(1, self.gradient_accumulation_steps) + 1}-"
            f"{self.step} waited for data {100 * share:.0f}% of the time "
            f"({1000 * sum(waits) / max(1, len(waits)):.1f} ms per batch): the data loader is slower "
            f"than training. Raise [training.dataloader] num_workers (now {workers}; with "
            "pin_memory = true), or pre-tokenize the text (python tools/tokenize_data.py) and train "
            "with --training.dataset shards; tools/bench_data.py measures each source")

    def _preemption_requested(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1, agreed over ranks so all stop at one step.

        With several ranks the flags are summed by an all-reduce each step. On GPUs its result is
        read two steps later (a non-blocking copy; waiting then costs nothing, as the device is
        still busy with the step after it), so the run stops at most two steps after the signal,
        at the same step on every rank; on the CPU (gloo) it is read at once."""
        flag = self._stop_signal is not None
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return flag
        import torch

        # filled on the device: torch.tensor([...], device=cuda) copies from pageable memory and waits
        # for the stream, a host sync every step
        t = torch.full((1,), int(flag), dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.device.type != "cuda":
            return bool(t.item())
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        queue = self.__dict__.setdefault("_stop_flags", [])
        queue.append((host, event))
        if len(queue) <= 2:
            return False
        host, event = queue.pop(0)
        event.synchronize()
        return bool(host.item())

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
        self._settle_loss_checks()
        self._finished = True  # close() then waits for every rank before the process group goes
        handover.release()  # trained, validated, saved: the next run of a grid may take the GPU
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
            _LEAVE_WITHOUT_FINALIZING = dist.get_backend() == "gloo"  # not "cuda:nccl,cpu:gloo"

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


def device_sum(x, mesh):
    """``x`` summed over ``mesh``'s ranks, as a device tensor (torchtitan's ``dist_sum`` reads
    the result back to the host, a sync; this leaves it on the device)."""
    import torch.distributed._functional_collectives as funcol

    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return funcol.all_reduce(x, reduceOp="sum", group=mesh)


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
        handover.wait_for_gate()  # imports done, GPU untouched (tools/ablate.py --prestart)
        main(NeoLLMTrainer)
        if _LEAVE_WITHOUT_FINALIZING:
            leave_without_finalizing()
    except (ConfigError, FileNotFoundError, handover.GateAbandoned) as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BadLossError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(3)


if __name__ == "__main__":
    run()
