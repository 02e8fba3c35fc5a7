"""Fault tolerance on top of torchtitan's CheckpointManager (used by neollm.train.NeoLLMTrainer).

* ``NeoLLMCheckpointManager``: torchtitan's manager whose resume picks the newest *valid*
  checkpoint (neollm.checkpoint.validate_checkpoint; warning about each broken newer one), that refuses an explicit
  ``--checkpoint.load_step`` naming a broken one, and that saves on demand (preemption).
* ``RNGState``: each rank's torch CPU (and CUDA) generator state, checkpointed so that dropout
  and any other sampling repeat exactly after a resume.
* ``LossGuard``: NaN/inf loss or a spike over ``[guard] max_loss_ratio`` x the running mean of
  the last ``[guard] window`` good losses stops the run naming the step, or skips the batch
  (no optimizer step) with ``[guard] on_bad_loss = "skip"``. The test runs on the device;
  ``PendingChecks`` brings its verdicts to the host without waiting for the device ("stop"
  reads them a step or more later; "skip" must read each before the optimizer step).

Testing hook (debug only): ``NEOLLM_INJECT_BAD_LOSS="3:nan,7:x50"`` makes the guard see NaN at
step 3 and 50 x the real loss at step 7 (only the value the guard checks changes; gradients are
the real ones). Nothing reads it unless it is set.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.tools.logging import logger

from neollm.checkpoint import (checkpoint_shapes, checkpoint_steps, holds_training_state, read_dcp_metadata,
                               shape_mismatches, validate_checkpoint)
from neollm.errors import ConfigError

INJECT_ENV = "NEOLLM_INJECT_BAD_LOSS"


class BadLossError(RuntimeError):
    """The loss went NaN/inf or spiked and ``[guard] on_bad_loss = "stop"``."""


class NeoLLMCheckpointManager(CheckpointManager):
    """torchtitan's CheckpointManager, resuming only from a checkpoint that validates.

    Installed on the trainer's existing manager (``__class__`` swap), so torchtitan builds it
    exactly as usual."""

    def _find_load_step(self, folder: str = "") -> int:
        folder = folder or self.folder
        for step in reversed(checkpoint_steps(folder)):
            path = os.path.join(folder, f"step-{step}")
            problem = validate_checkpoint(path)
            if problem is None:
                return step
            logger.warning(f"Skipping broken checkpoint {path}: {problem}; trying an older one")
        return -1

    def load(self, step: int = -1) -> bool:
        if self.enable and step not in (-1, 0) and os.path.isdir(self.folder):
            path = self._create_checkpoint_id(step)
            problem = validate_checkpoint(path) if os.path.isdir(path) else "it does not exist"
            if problem:
                raise ConfigError(
                    f"[checkpoint] load_step {step}: {path} cannot be loaded ({problem}); "
                    f"choose another step from {checkpoint_steps(self.folder)} or -1 for the newest good one"
                )
        if self.enable and step == -1 and os.path.isdir(self.folder):
            step = self._find_load_step()
            if step == -1:
                return False
        self._resolved_step = step
        if self.enable and step not in (-1, 0) and os.path.isdir(self.folder):
            path = self._create_checkpoint_id(step)
            if not holds_training_state(path):
                return self._resume_from_model_only(step, path)
            self._check_model_fits(path)
        return super().load(step)

    final_step: int | None = None
    """The run's ``training.steps`` (set by the trainer)."""

    def _resume_from_model_only(self, step: int, path: str) -> bool:
        """The newest (or named) checkpoint holds only the model: the final save of a run with
        ``[checkpoint] last_save_model_only = true``. At or past ``training.steps`` the run has
        finished (it was stopped after its last save, before it exited): mark the step reached and
        train nothing, as torchtitan does with a full final checkpoint; the weights are not loaded,
        since no step uses them. Before it, stop with what to do instead (no optimizer, schedule or
        data position to resume from), never train on from a half-restored state."""
        if self.final_step is not None and step >= self.final_step:
            logger.warning(f"{path} is this run's final checkpoint (model only): training finished at step "
                           f"{step} of {self.final_step}; nothing to train")
            train_state = self.states["train_state"]
            train_state.load_state_dict({**train_state.state_dict(), "step": step})
            return True
        full = [s for s in checkpoint_steps(self.folder)
                if s < step and validate_checkpoint(self._create_checkpoint_id(s)) is None
                and holds_training_state(self._create_checkpoint_id(s))]
        earlier = (f"; or resume the newest full checkpoint with --checkpoint.load_step {full[-1]}" if full
                   else "")
        raise ConfigError(
            f"[checkpoint] {path} holds only the model (the final save of a {step}-step run with "
            f"[checkpoint] last_save_model_only = true), so training cannot resume from it"
            f"{'' if self.final_step is None else f' to step {self.final_step}'} (no optimizer, schedule or data position). Train on from its weights in a new "
            f"--job.dump_folder with --checkpoint.initial_load_path {path} --checkpoint.initial_load_model_only"
            f"{earlier}")

    def _check_model_fits(self, path: str) -> None:
        """Refuse, naming the parameters, a checkpoint whose model parameters differ in name or shape from
        this run's model (another flavor or ``[model] overrides``, or code whose layout changed), before
        DCP fails inside its load."""
        model = self.states.get("model")
        if model is None:
            return
        expected = {k.replace("_orig_mod.", ""): tuple(v.shape) for k, v in model.state_dict().items()}
        stored = checkpoint_shapes(path)
        if not set(expected) & set(stored):
            return  # names this check does not know how to match: DCP's own check decides
        missing, wrong, older = shape_mismatches(expected, stored)
        if not (missing or wrong or older):  # an older layout loads for inference, but a resume cannot reshape
            return
        wrong += [f"{k}: checkpoint {tuple(stored[k])} vs model {expected[k]}" for k in older]
        hint = (" It was written before MEA's GroupNorm affine became one flat vector (commit 4ab54bb): resume it "
                "with the code that wrote it; tools/generate.py, tools/evaluate.py and tools/convert_to_hf.py "
                "load its weights." if older else "")
        detail = "; ".join(wrong[:4] + ([f"missing from the checkpoint: {missing[:4]}"] if missing else []))
        raise ConfigError(f"[checkpoint] {path} holds another model than this run builds ({detail}). Resume with "
                          "the flavor and [model] overrides it was written with, or give a new --job.dump_folder."
                          + hint)

    def _states_to_load(self, model_only: bool) -> dict[str, Any]:
        states = super()._states_to_load(model_only)
        if model_only:
            return states
        # States NeoLLM added (rng, loss_guard) may be absent from older checkpoints or, for
        # per-rank RNG, from a run on another number of ranks: load what is there.
        step = getattr(self, "_resolved_step", -1)
        keys = set()
        if step not in (-1, 0):
            try:
                keys = set(read_dcp_metadata(self._create_checkpoint_id(step)).state_dict_metadata)
            except Exception:
                keys = set()
        for name, state in list(states.items()):
            prefixes = getattr(state, "checkpoint_prefixes", None)
            if prefixes is None:
                continue
            if not all(any(k.startswith(f"{name}.{p}") for k in keys) for p in prefixes):
                logger.warning(f"Checkpoint has no '{name}' state for this rank: keeping the fresh one")
                states.pop(name)
        return states

    before_save = None
    """Called before a checkpoint is written (the trainer settles its pending loss checks, so
    no checkpoint holds a step the guard would reject)."""

    def save(self, curr_step: int, last_step: bool = False) -> None:
        self._saving_step = curr_step
        if self.before_save is not None and self._should_save(curr_step, last_step):
            self.before_save()
        super().save(curr_step, last_step)

    def _purge_stale_checkpoints(self) -> None:
        """keep_latest_k counted over *valid* checkpoints (torchtitan counts every step-N folder,
        so broken leftovers of a crashed attempt would make it delete good ones). Broken folders
        older than the step being saved are removed too; newer ones are left (skipped at load,
        overwritten when training reaches their step). The step being saved counts as valid
        (an async save is still in flight)."""
        if not (self.keep_latest_k > 0 and dist.get_rank() == 0 and os.path.isdir(self.folder)):
            return
        if self.enable_ft_dataloader_checkpoints:
            return super()._purge_stale_checkpoints()
        current = getattr(self, "_saving_step", None)
        valid, broken = [], []
        for step in checkpoint_steps(self.folder):
            path = os.path.join(self.folder, f"step-{step}")
            (valid if step == current or validate_checkpoint(path) is None else broken).append(step)
        doomed = valid[: -self.keep_latest_k] + [s for s in broken if current is not None and s < current]
        for step in doomed:
            assert self.purge_thread is not None
            self.purge_queue.put(os.path.join(self.folder, f"step-{step}"))

    def _save_last_step(self, curr_step: int) -> None:
        super()._save_last_step(curr_step)
        self._purge_stale_checkpoints()  # torchtitan skips keep_latest_k on the last save

    def save_now(self, step: int) -> str:
        """Save a full (resumable) checkpoint at ``step`` now, whatever the interval; wait for it."""
        path = self._create_checkpoint_id(step)
        if self.enable and not self.load_only and validate_checkpoint(path) is not None:
            interval = self.interval
            self.interval = 1  # torchtitan's regular (full-state) save path, not last_step's
            try:
                self.save(step)
            finally:
                self.interval = interval
            self._async_wait()
        return path


# ---------------------------------------------------------------- RNG state


class RNGState:
    """This rank's torch generators, under a per-rank key (DCP keeps one copy per key)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.checkpoint_prefixes = [f"rank{self.rank}."]

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return {f"rank{self.rank}": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get(f"rank{self.rank}")
        if not state:
            return
        torch.set_rng_state(state["cpu"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].cpu())


# ---------------------------------------------------------------- loss guard


def parse_injections(text: str | None) -> dict[int, str]:
    """``"3:nan,7:x50"`` -> {3: "nan", 7: "x50"} (see the module docstring)."""
    out: dict[int, str] = {}
    for item in (text or "").split(","):
        if item.strip():
            step, _, what = item.strip().partition(":")
            out[int(step)] = what or "nan"
    return out


class LossGuard:
    """Decides, for each step's global loss, whether it is good (and tracks the running mean).

    The decision is made on the loss's device, without reading the loss back:
    ``check_tensor(step, loss)`` returns a 3-element float tensor ``[bad, loss, running mean]``
    on that device (history and count live there too), which the trainer reads when it suits it
    (``PendingChecks``). ``check(step, loss)`` is the same decision read back at once (None for
    a good loss, else the reason it is bad). The window of recent good losses is checkpointed
    (``state_dict``) so a resumed run decides identically."""

    def __init__(self, on_bad_loss: str = "stop", max_loss_ratio: float = 0.0, window: int = 50,
                 warmup_steps: int = 10, max_consecutive_skips: int = 10) -> None:
        self.on_bad_loss = on_bad_loss
        self.max_loss_ratio = max_loss_ratio
        self.window = max(1, window)
        self.warmup_steps = warmup_steps
        self.max_consecutive_skips = max_consecutive_skips
        self.history = torch.zeros(self.window, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.int64)  # good losses seen
        self.consecutive_skips = 0
        self.injections = parse_injections(os.environ.get(INJECT_ENV))
        self.checkpoint_prefixes = ["history"]

    @property
    def enabled(self) -> bool:
        return self.on_bad_loss != "off"

    def running_mean(self) -> float | None:
        n = int(min(self.count.item(), self.window))
        if n == 0:
            return None
        return float(self.history[:n].mean())

    def inject(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        what = self.injections.get(step)
        if what is None:
            return loss
        if what.startswith("x"):
            return loss * float(what[1:])
        return torch.full_like(loss, float(what))  # "nan", "inf"

    def _to(self, device: torch.device) -> None:
        if self.history.device != device:
            self.history = self.history.to(device)
            self.count = self.count.to(device)

    @torch.no_grad()
    def check_tensor(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """``[bad, loss, running mean]`` (float64, on ``loss``'s device); a good loss enters the
        window. Only device operations: no host sync."""
        self._to(loss.device)
        loss = self.inject(step, loss.detach().reshape(()).to(torch.float64))
        n = torch.clamp(self.count, max=self.window)
        slots = torch.arange(self.window, device=loss.device)
        mean = (self.history * (slots < n)).sum() / torch.clamp(n, min=1)
        bad = ~torch.isfinite(loss)
        if self.max_loss_ratio > 0:
            armed = (self.count >= max(1, self.warmup_steps))
            bad = bad | (armed & (loss > self.max_loss_ratio * mean))
        good = ~bad
        slot = torch.remainder(self.count, self.window).reshape(1)
        self.history.index_copy_(0, slot, torch.where(good, loss, self.history.index_select(0, slot)[0]).reshape(1))
        self.count.add_(good.to(torch.int64))
        mean = torch.where(n > 0, mean, torch.full_like(mean, float("nan")))
        return torch.stack([bad.to(torch.float64), loss, mean])

    def reason(self, record) -> str | None:
        """None for a good ``[bad, loss, mean]`` record (read back to the host), else why."""
        bad, loss, mean = (float(x) for x in record)
        if not bad:
            return None
        if not math.isfinite(loss):
            return f"loss is {loss}"
        return (f"loss {loss:.4f} is over [guard] max_loss_ratio {self.max_loss_ratio:g} x the "
                f"running mean {mean:.4f}")

    def check(self, step: int, loss) -> str | None:
        """``check_tensor`` read back at once (one host sync)."""
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss), dtype=torch.float64, device=self.history.device)
        return self.reason(self.check_tensor(step, loss).tolist())

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        history = state_dict["history"]
        if history.shape == self.history.shape:
            self.history.copy_(history)
            self.count.copy_(state_dict["count"])


class PendingChecks:
    """Loss-guard records on their way to the host, read without stalling the device.

    ``add(step, record)`` starts a non-blocking copy of the device record into pinned host
    memory and records a CUDA event after it; ``ready()`` returns the records whose copy has
    finished (``Event.query()``, never a wait); ``drain()`` waits for all of them (used at log
    steps, before a checkpoint is written and at the end). On the CPU a record is ready at once."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, torch.Tensor, Any]] = []

    def add(self, step: int, record: torch.Tensor) -> None:
        if record.device.type == "cuda":
            host = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
            host.copy_(record, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.queue.append((step, host, event))
        else:
            self.queue.append((step, record, None))

    def _take(self, wait: bool) -> list[tuple[int, list[float]]]:
        out = []
        while self.queue:
            step, host, event = self.queue[0]
            if event is not None:
                if not wait and not event.query():
                    break
                event.synchronize()
            out.append((step, host.tolist()))
            self.queue.pop(0)
        return out

    def ready(self) -> list[tuple[int, list[float]]]:
        return self._take(wait=False)

    def drain(self) -> list[tuple[int, list[float]]]:
        return self._take(wait=True)
