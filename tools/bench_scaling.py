"""Multi-GPU scaling of the real trainer: the same TOML on 1, 2, ... N processes, side by side.

Each layout is one ``./run_train.sh`` run (torchrun, FSDP2; ``RxS`` is HSDP: R replicas of S-way
sharding, NGPU = R * S; ``Rx1`` is DDP) with the config's global batch unchanged, so every layout takes the same
optimizer steps on the same tokens; only the split across ranks (and the micro-batches) differ.
Per layout: tokens per step, median step time over the steps after ``--skip`` (compilation and
warm-up excluded), total and per-GPU tok/s, scaling against the first layout (ideally NGPU x) and
peak memory; and how far its training losses are from the first layout's over the first
``--compare-steps`` steps. By default rank r of W reads the r-th contiguous block of documents
(neollm/data), so the layouts train on different sequences at each step and their losses agree
only statistically. For a step-for-step comparison, train on token shards with
``--set data.interleave_ranks=true`` (every step then trains on the same sequences for any rank
count) and ``--seed-checkpoint`` (every layout starts from one initialisation, written once by
torchtitan's ``create_seed_checkpoint``: a sharded init need not draw the numbers a whole one
draws); the losses then differ only by the order of the gradient sums and bf16 rounding.

    python tools/bench_scaling.py --config train_configs/neollm_135m.toml --layouts 1,2 --steps 30 \\
        --out outputs/scaling --set compile.enable=true
    python tools/bench_scaling.py --config train_configs/neollm_135m.toml --layouts 1,8,2x4 --steps 200 ...
    python tools/bench_scaling.py --config train_configs/neollm_135m.toml --layouts 1,8 --batch-per-gpu 64 ...

``--batch-per-gpu B`` measures weak scaling instead: each layout trains a global batch of B
sequences per GPU (more tokens per step with more GPUs, the way to use several GPUs at this
model size: docs/running.md), so speedup is tok/s against the first layout's and efficiency
divides it by the GPU ratio; the losses are not compared (the layouts train different batches).

The micro-batch per rank is the config's local batch, or the global batch / data-parallel degree
when that is smaller (``--local-batch`` to fix it for every layout). Validation and checkpoints are
off, and so are the per-technique scalars of ``[monitor]``: every step is a log step here (for its
time and loss), and those scalars (one gather per parameter under FSDP) are a log-step cost that a
run with ``log_freq = 10`` pays once in ten steps. A finished layout (``<out>/<layout>/result.json``) is skipped when the command is rerun, so a
long comparison can be spread over several jobs (its numbers are recomputed from its metrics.jsonl
with this run's ``--skip``; results.json keeps each layout's commit and device). Writes
``results.md`` and ``results.json``, one row per layout with ``name`` (the flavor), ``mode`` (strong or
weak), ``layout``, ``gpus``, ``parallelism`` (single, fsdp, ddp or hsdp), ``tok_per_s``, ``speedup``,
``efficiency`` (tok/s per GPU against the first layout's), peak memory and the losses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neollm.ablation.runner import RunFailed
from neollm.bench.scaling import run_layouts, write_results
from neollm.errors import ConfigError
from neollm.provenance import tool_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="the TOML every layout runs")
    p.add_argument("--layouts", default="1,2", help="comma-separated: N (FSDP over N GPUs) or RxS (HSDP)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the step time (compile, warm-up)")
    p.add_argument("--compare-steps", type=int, default=10, help="steps whose losses are compared")
    p.add_argument("--local-batch", type=int, default=None, help="micro-batch per rank for every layout")
    p.add_argument("--batch-per-gpu", type=int, default=None,
                   help="weak scaling: each layout's global batch is this many sequences per GPU")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a torchtitan key for every layout (repeatable)")
    p.add_argument("--seed-checkpoint", action="store_true",
                   help="start every layout from one seed checkpoint (same initial weights)")
    p.add_argument("--out", type=Path, required=True)
    opts = p.parse_args(argv)
    try:
        results, global_batch = run_layouts(opts)
    except (ConfigError, FileNotFoundError, RunFailed, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = tool_command("bench_scaling.py", argv)
    print(write_results(opts, results, global_batch, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
