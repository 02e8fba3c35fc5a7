"""How an ablation grid spends one GPU job: budget in steps, runs at once, runs that still fit.

* the default budget is one epoch of the training shards (their index.json), rounded up to a
  whole number of validation intervals, so every curve ends on a validation point;
* ``--parallel auto``: as many runs per GPU as its free memory holds, from the largest peak
  memory a finished run of the grid measured (the first run goes alone when none has);
* ``--time-budget``: a run is started only when it should still end inside the budget, estimated
  from the finished runs of its group (else of the grid) and the runs that would share its GPU;
* compiled runs share one inductor/Triton cache folder, so autotuning and kernels compiled by
  one variant serve the next.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

from neollm.ablation.runner import variant_group
from neollm.errors import ConfigError

# a process's CUDA context and allocator slack, beyond what torch reports as reserved
PROCESS_OVERHEAD_GIB = 1.5
MEMORY_MARGIN = 1.2  # variants of one grid differ a little in activation memory


def epoch_steps(job, val_freq: int) -> int | None:
    """Steps covering one epoch of the config's training shards, rounded up to a multiple of
    ``val_freq``; None when the config does not read pre-tokenized shards."""
    if job.training.dataset != "shards":
        return None
    from neollm.data.shards import read_index

    try:
        index = read_index(job.training.dataset_path)
    except FileNotFoundError as error:
        raise ConfigError(f"one epoch of {job.training.dataset_path} is the default budget, but: {error} "
                          "(make the shards with tools/tokenize_data.py, or give --steps N)") from None
    if job.training.global_batch_size <= 0:
        raise ConfigError("one epoch needs [training] global_batch_size set (or give --steps N)")
    tokens = index["splits"]["train"]["tokens"]
    per_step = job.training.global_batch_size * job.training.seq_len
    return math.ceil(math.ceil(tokens / per_step) / val_freq) * val_freq


def scaled_warmup(config_warmup: int, config_steps: int, steps: int) -> int:
    """The config's warm-up as the same fraction of ``steps`` (at least 1 when it had any)."""
    if config_warmup <= 0 or config_steps <= 0:
        return config_warmup
    return max(1, round(config_warmup * steps / config_steps))


def gpu_memory_gib() -> list[tuple[float, float]]:
    """(total, free) GiB of every visible GPU, from nvidia-smi (the scheduler holds no CUDA
    context of its own); empty without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    proc = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.total,memory.used",
                           "--format=csv,noheader,nounits"], capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    rows = {}
    for line in proc.stdout.strip().splitlines():
        index, total, used = (part.strip() for part in line.split(","))
        rows[index] = (float(total) / 1024, (float(total) - float(used)) / 1024)
    order = visible.split(",") if visible else sorted(rows, key=int)
    return [rows[i] for i in order if i in rows]


def runs_per_gpu(free_gib: float, peak_gib: float, cpu_cores: int, cap: int = 8) -> int:
    """How many runs of measured peak ``peak_gib`` fit together in ``free_gib`` (at least 1),
    also bounded by two CPU cores per run (data loading, the Python side) and ``cap``."""
    per_run = peak_gib * MEMORY_MARGIN + PROCESS_OVERHEAD_GIB
    return max(1, min(int(free_gib // per_run), max(1, cpu_cores // 2), cap))


def estimate_seconds(group: str, finished: list[dict], runs_on_gpu: int = 1) -> float | None:
    """Wall seconds a run of ``group`` should take with ``runs_on_gpu`` runs (itself included) on
    its GPU; None when nothing has finished. From each finished run (of the group, else of the
    grid; runs resumed from a checkpoint do not count): its training seconds (tokens / tok/s)
    scale with the runs sharing the GPU, as if the GPU were shared evenly (an upper bound when
    small runs overlap), the rest (start-up, compilation, validation) does not; the largest."""
    whole = [r for r in finished if not r.get("resumed") and r.get("wall_s")]
    same = [r for r in whole if variant_group(r) == group]

    def estimate(r: dict) -> float:
        tps = (r.get("tps_median") or 0) * r.get("processes", 1)
        train = min(r["wall_s"], r["tokens"] / tps) if tps and r.get("tokens") else 0.0
        return r["wall_s"] - train + train * runs_on_gpu / (r.get("runs_sharing_gpu") or 1)

    return max((estimate(r) for r in same or whole), default=None)


def compile_cache_env(cache_dir: Path) -> dict[str, str]:
    """Environment for compiled runs sharing one inductor/Triton cache (FX graph and AOT
    autograd caches on, Triton's autotuning results cached)."""
    cache_dir = Path(cache_dir).resolve()
    return {"TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
            "TRITON_CACHE_DIR": str(cache_dir / "triton"),
            "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
            "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
            "TRITON_CACHE_AUTOTUNING": "1"}
