"""Ablation bench: one base config, one module swapped per variant, same data and budget.

    python tools/ablate.py --config train_configs/debug.toml --out outputs/ablate_mixers \\
        --vary layer_pattern=A,DA,D --steps 200 --seeds 0,1,2
    python tools/ablate.py --config train_configs/neollm_135m.toml --out outputs/loo --leave-one-out
    python tools/ablate.py --config train_configs/neollm_135m.toml --out outputs/add1 --add-one
    python tools/ablate.py --config X.toml --out outputs/mine --variants my_variants.toml

Every variant is ./run_train.sh on the same config file with only its own ``[model] overrides``
entries / torchtitan keys changed (neollm/ablation/grid.py); validation runs at a fixed interval
on fixed batches so validation loss can be compared against tokens and training seconds. By
default every run is compiled (one shared compile cache under --out), trains one epoch of the
config's token shards, and as many runs share each GPU as its memory holds (--parallel auto).
Each finished run's result is written as it ends; rerunning the same command skips finished
variants and resumes or restarts the others, so a grid continues over several GPU jobs
(--time-budget keeps a job from starting runs it cannot finish). Writes results.md,
results.json, val_loss.png, val_loss_time.png and delta.png into --out. See docs/ablations.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from neollm.ablation import bench


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="base TOML (e.g. train_configs/neollm_135m.toml)")
    p.add_argument("--out", required=True, type=Path, help="output folder: one dump folder per variant + results")
    mode = p.add_argument_group("variants (--vary and --variants combine; the others stand alone)")
    mode.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                      help="a model field (layer_pattern, mlp_type, gpas...) or dotted torchtitan key "
                           "(optimizer.lr); repeat for a cartesian grid")
    mode.add_argument("--variants", type=Path, help="TOML of [variants.<name>] with overrides = [...], set = [...]")
    mode.add_argument("--leave-one-out", action="store_true",
                      help="each technique switch of the base model off in turn (-<switch>)")
    mode.add_argument("--add-one", action="store_true",
                      help="every switch off (plain, the reference), then each switch on alone (+<switch>)")
    p.add_argument("--steps", help="training steps of every variant: N, 'epoch' (one epoch of the config's "
                                   "token shards, rounded up to whole validation intervals) or 'config' "
                                   "(the config's own); default: epoch for a shards config, else config. "
                                   "The config's warm-up keeps its fraction of the steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="applied to every variant (model field or dotted torchtitan key)")
    p.add_argument("--seeds", help="comma-separated [debug] seeds: the reference runs at each (to measure "
                                   "the noise), the other variants at the first (default: the config's seed)")
    p.add_argument("--seeds-all", action="store_true", help="run every variant at every seed")
    p.add_argument("--seeds-for", metavar="NAMES", action="append",
                   help="comma-separated variants also run at every seed (e.g. --seeds-for=-mea,-simplegpt: "
                        "settle deltas near the noise threshold); repeat it for a name holding commas")
    p.add_argument("--equal-time", type=Path, metavar="GRID",
                   help="train each variant for the reference's seconds: its steps scaled by its steps per second over "
                        "the reference's in the finished grid GRID (a folder with results.json, run with --parallel 1; "
                        "use another --out). Pick a --val-freq that rounds the steps finely")
    p.add_argument("--val-freq", type=int, help="validate every N steps (default: config's, else steps/10)")
    p.add_argument("--val-steps", type=int, help="validation batches per evaluation (default: config's, else 10)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile every run (default on; --no-compile for eager)")
    p.add_argument("--cache-dir", type=Path,
                   help="inductor/Triton cache shared by the runs (default <out>/compile_cache)")
    p.add_argument("--ngpu", type=int, default=int(os.environ.get("NGPU", "1")), help="processes per run")
    p.add_argument("--parallel", default="auto",
                   help="runs at once: N, or auto (default): as many per GPU as its free memory holds, "
                        "from the largest peak memory a finished run measured; the first run goes alone "
                        "when none has. 1 without a GPU. Runs are spread over the visible GPUs in groups "
                        "of --ngpu; runs sharing a GPU do not measure their own speed (see the report)")
    p.add_argument("--max-parallel", type=int, default=8, help="upper bound of --parallel auto per GPU")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no run that would end after SECONDS from now (estimated from the finished "
                        "runs of its group, else of the grid, and the runs that would share its GPU); "
                        "rerun to continue")
    p.add_argument("--prestart", action=argparse.BooleanOptionalAction, default=True,
                   help="with --parallel 1 on one GPU (group): start the next run while the GPU is busy; it imports and waits "
                        "at a gate, which opens once a run has finished training and memory allows "
                        "(saves its ~12 s start-up and the previous run's ~12 s exit per run)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's checkpoints (default: removed once its result is written)")
    p.add_argument("--max-runs", type=int, help="stop after starting this many runs (rerun to continue)")
    p.add_argument("--report-only", action="store_true",
                   help="write results.md/json and plots from the finished variants; train nothing")
    p.add_argument("--dry-run", action="store_true", help="print each variant's command and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = build_parser().parse_args(argv)
    return bench.run(opts, argv)


if __name__ == "__main__":
    sys.exit(main())
