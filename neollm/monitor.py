"""Run monitoring beside torchtitan's metrics (used by neollm.train.NeoLLMTrainer).

* ``RunLogger`` wraps torchtitan's metric logger (tensorboard / wandb, whatever ``[metrics]``
  enabled): everything still goes there, and rank 0 also appends each logged dict, at full float
  precision, as one line of ``<dump_folder>/metrics.jsonl`` (``[monitor] jsonl``). A resumed run
  appends: for a step logged twice, the later line wins (neollm/plot.py reads it so).
* ``technique_scalars(model)``: GPAS gates SiLU(g), PolyNorm weights, gated-residual gate
  means, read from the parameters at log steps only (never in the forward pass).
* ``Progress``: ``progress: step 120/1000 (12.0%)  elapsed 0:04:10  ETA 0:30:33  2.08 s/step``.
* ``prepare_wandb``: with ``[metrics] enable_wandb`` and no API key or no route to the wandb
  server, sets ``WANDB_MODE=offline`` before torchtitan starts wandb; ``wandb_sync_hint``
  gives the ``wandb sync <dir>`` command to upload the offline run later.
"""

from __future__ import annotations

import datetime
import json
import math
import netrc
import os
import socket
import time
from typing import Any

import torch
from torch import nn
from torchtitan.components.metrics import BaseLogger, LoggerContainer, WandBLogger
from torchtitan.tools.logging import logger


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": JSON has no literal for them
    return value


class RunLogger(BaseLogger):
    """torchtitan's logger plus a JSONL copy (rank 0 only writes the file)."""

    def __init__(self, inner: BaseLogger, jsonl_path: str | None) -> None:
        self.inner = inner
        self.jsonl = None
        if jsonl_path:
            os.makedirs(os.path.dirname(jsonl_path) or ".", exist_ok=True)
            self.jsonl = open(jsonl_path, "a", buffering=1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.inner.log(metrics, step)
        if self.jsonl is not None:
            record = {"step": step, "time": time.time()}
            record.update({k: _jsonable(v) for k, v in metrics.items()})
            self.jsonl.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.inner.close()
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def read_metrics_jsonl(path) -> dict[str, dict[int, float]]:
    """The numbers of a ``metrics.jsonl`` this logger wrote: tag -> step -> value. A step logged
    twice (a resumed run) keeps its last value; lines cut by a crash and non-numbers are skipped;
    a missing file gives no series."""
    from pathlib import Path

    path = Path(path)
    series: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return series
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.pop("step", None)
        if step is None:
            continue
        for tag, value in record.items():
            if isinstance(value, str) and value in ("nan", "inf", "-inf"):
                value = float(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and tag != "time":
                series.setdefault(tag, {})[int(step)] = float(value)
    return series


def _full(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (gathers an FSDP/TP DTensor: every rank must call this)."""
    data = param.detach()
    if hasattr(data, "full_tensor"):
        data = data.full_tensor()
    return data.float()


@torch.no_grad()
def technique_scalars(model: nn.Module) -> dict[str, float]:
    """Per-technique scalars worth watching, keyed ``techniques/<kind>/<module path>``.

    Collective under FSDP (each parameter is gathered): call it on every rank, same order. The
    values stay on the device until one ``tolist()`` at the end: one host sync per log step, not
    one per value (~60 for NeoLLM-135M)."""
    from neollm.model.norms import GPAS, GatedResidual, PolyNorm

    out: dict[str, float] = {}
    moe_aux = getattr(model, "last_moe_aux_loss", None)  # this rank's last micro-batch, no coefficient
    if moe_aux is not None:
        out["techniques/moe_aux_loss/sum_over_layers"] = float(moe_aux)
    keys: list[str] = []
    values: list[torch.Tensor] = []
    for name, module in model.named_modules():
        name = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
        if isinstance(module, GPAS):
            keys.append(f"techniques/gpas_silu_gate/{name}")
            values.append(torch.nn.functional.silu(_full(module.gate)).mean().reshape(1))
        elif isinstance(module, PolyNorm):
            weight = _full(module.weight).reshape(-1)
            keys += [f"techniques/polynorm_w{i + 1}/{name}" for i in range(weight.numel())]
            values.append(weight)
        elif isinstance(module, GatedResidual):
            keys.append(f"techniques/residual_gate_sigmoid_mean/{name}")
            values.append(torch.sigmoid(_full(module.gate)).mean().reshape(1))
    if values:
        out.update(zip(keys, torch.cat(values).tolist()))
    return out


class OutputGateProbe:
    """Mean sigmoid(gate) of each attention output gate over one step's forward passes.

    The gates depend on the input, so they are read from activations: forward hooks are put on
    the ``gate_proj`` modules for one (log) step only and removed after it; values are this
    rank's batch. Not used with torch.compile (adding hooks would recompile the blocks)."""

    def __init__(self, model: nn.Module) -> None:
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for name, module in model.named_modules():
            proj = getattr(module, "gate_proj", None)
            if getattr(module, "gate_kind", "none") != "none" and proj is not None:
                key = "techniques/attn_output_gate_mean/" + name.replace("_orig_mod.", "").replace(
                    "_checkpoint_wrapped_module.", "")
                self.sums[key] = []
                self.handles.append(proj.register_forward_hook(self._hook(key)))

    def _hook(self, key: str):
        def hook(module, inputs, output):
            self.sums[key].append(torch.sigmoid(output.detach().float()).mean())
        return hook

    def close(self) -> dict[str, float]:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return {k: torch.stack(v).mean().item() for k, v in self.sums.items() if v}


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class Progress:
    """Steps done / total, elapsed and ETA, from the steps run by this process (resume-aware)."""

    def __init__(self, total_steps: int) -> None:
        self.total = total_steps
        self.start_time: float | None = None
        self.start_step = 0

    def start(self, step: int) -> None:
        self.start_time = time.perf_counter()
        self.start_step = step

    def line(self, step: int) -> str:
        assert self.start_time is not None
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        rate = elapsed / done if done else float("nan")
        left = (self.total - step) * rate if done else float("nan")
        eta = _hms(left) if math.isfinite(left) else "?"
        return (f"progress: step {step}/{self.total} ({100 * step / max(1, self.total):.1f}%)  "
                f"elapsed {_hms(elapsed)}  ETA {eta}  {rate:.2f} s/step")


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def prepare_wandb(enable_wandb: bool) -> str | None:
    """Choose wandb's mode before torchtitan's WandBLogger calls wandb.init. Returns the mode set."""
    if not enable_wandb:
        return None
    os.environ.setdefault("WANDB_PROJECT", "neollm")
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1].split("/")[0]
    if not _has_wandb_key():
        reason = "no WANDB_API_KEY / netrc entry"
    elif not _reachable(host.split(":")[0]):
        reason = f"{host} is unreachable"
    else:
        return None
    os.environ["WANDB_MODE"] = "offline"
    logger.info(f"wandb: {reason}: logging offline (WANDB_MODE=offline)")
    return "offline"


def find_wandb_logger(metric_logger: BaseLogger) -> WandBLogger | None:
    inner = metric_logger.inner if isinstance(metric_logger, RunLogger) else metric_logger
    if isinstance(inner, WandBLogger):
        return inner
    if isinstance(inner, LoggerContainer):
        for item in inner._loggers:
            if isinstance(item, WandBLogger):
                return item
    return None


def wandb_sync_hint(metric_logger: BaseLogger) -> str | None:
    """``wandb sync <run dir>`` for an offline wandb run (call before the logger closes)."""
    found = find_wandb_logger(metric_logger)
    if found is None or found.wandb.run is None:
        return None
    if not found.wandb.run.settings._offline:
        return None
    run_dir = os.path.dirname(found.wandb.run.dir.rstrip("/"))  # .../wandb/offline-run-*/files
    return f"wandb sync {run_dir}"
