"""The real trainer's throughput beside tools/bench.py's, for the same flavor, in one call.

Runs ``./run_train.sh`` (torchrun, preflight included) on ``--config`` with the given overrides,
checkpoints off, for ``--steps`` steps logged every ``--log-freq``, into a temporary dump folder;
reads its ``metrics.jsonl``: tok/s is the mean of torchtitan's ``throughput(tps)`` (tokens per
second per GPU) over the log intervals after the first ``--skip`` steps (compilation, warm-up),
times the number of GPUs; peak memory is the largest ``memory/max_active(GiB)``. Then runs
``tools/bench.py --json`` for the TOML's flavor at its local batch, seq_len, vocabulary, loss and
compile settings. Writes JSON rows ``{name, source: "trainer" | "bench", tok_per_s, peak_gib, first_step_s}``
with device, date and commit (neollm/provenance.py). ``--profile`` also records the run's last three steps with
torch.profiler and adds where a step's time goes (wall, GPU busy and idle, the optimizer's host and GPU time, the
top kernels: neollm/bench/trace.py) to the trainer's row; the mean tok/s then leaves those steps' intervals out,
but the profiler slows the whole run (the row says ``profiler_attached``): take speeds from a run without it.

    python tools/bench_trainer.py --config train_configs/neollm_135m.toml --steps 150 \\
        --out benchmarks/trainer_neollm_135m.json -- --training.dataset shards \\
        --training.dataset_path data/shards/wiki_vital_en
    python tools/bench_trainer.py --config train_configs/debug.toml --steps 6 --log-freq 2 --skip 2 \\
        --bench-steps 2 --bench-warmup 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="train_configs/neollm_135m.toml")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--log-freq", type=int, default=10)
    p.add_argument("--skip", type=int, default=0, help="steps left out of the mean (default: the first log interval "
                                                       "and a fifth of the run, whichever is more)")
    p.add_argument("--ngpu", type=int, default=1)
    p.add_argument("--no-bench", action="store_true", help="time the trainer only")
    p.add_argument("--bench-steps", type=int, default=20)
    p.add_argument("--bench-warmup", type=int, default=5)
    p.add_argument("--name", default="", help="row name (default: the TOML's flavor)")
    p.add_argument("--out", type=Path, help="JSON file to write (e.g. benchmarks/trainer_<flavor>.json)")
    p.add_argument("--keep", type=Path, help="dump folder to keep (default: a temporary one)")
    p.add_argument("--profile", action="store_true",
                   help="also profile the run's last 3 steps (torchtitan's [profiling]) and print where "
                        "a step's time goes (neollm/bench/trace.py); tok/s leaves those steps' intervals out")
    p.add_argument("overrides", nargs="*", help="--section.key value overrides for the trainer (after --)")
    opts = p.parse_args(argv)

    from neollm.bench.trainer import measure, summary
    from neollm.errors import ConfigError
    from neollm.provenance import tool_command

    try:
        report = measure(opts, tool_command("bench_trainer.py", argv))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(report, opts.ngpu))
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
