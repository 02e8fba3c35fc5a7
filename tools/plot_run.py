"""Plot a NeoLLM run's metrics as PNG curves: loss (train and validation), LR, throughput.

    python tools/plot_run.py outputs/debug                  # a run's dump folder
    python tools/plot_run.py outputs/debug/metrics.jsonl    # NeoLLM's JSONL metrics file
    python tools/plot_run.py outputs/debug/tb               # torchtitan's tensorboard events
    python tools/plot_run.py outputs/debug --out plots/

Reads ``metrics.jsonl`` (written by the trainer, [monitor] jsonl) when there is one, else every
tensorboard event file under the folder. For a step logged more than once (a resumed run) the
last value wins. Writes loss.png, lr.png, throughput.png, grad_norm.png and, when logged,
techniques.png into --out (default: <run>/plots).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neollm.plot import load, plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="dump folder, metrics.jsonl or tensorboard folder")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/plots)")
    args = parser.parse_args(argv)
    if not args.run.exists():
        print(f"error: {args.run} does not exist: give a run's dump folder", file=sys.stderr)
        return 2
    try:
        series = load(args.run)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    run_dir = args.run if args.run.is_dir() else args.run.parent
    out = args.out or (run_dir / "plots")
    written = plot(series, out, title=run_dir.name)
    if not written:
        print(f"error: no loss / lr / throughput metrics found in {args.run}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
