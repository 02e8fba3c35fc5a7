"""The real trainer's throughput beside tools/bench.py's, for the same flavor, in one call.

Runs ``./run_train.sh`` (torchrun, preflight included) on ``--config`` with the given overrides,
checkpoints off, for ``--steps`` steps logged every ``--log-freq``, into a temporary dump folder;
reads its ``metrics.jsonl``: tok/s is the mean of torchtitan's ``throughput(tps)`` (tokens per
second per GPU) over the log intervals after the first ``--skip`` steps (compilation, warm-up),
times the number of GPUs; peak memory is the largest ``memory/max_active(GiB)``. Then runs
``tools/bench.py --json`` for the TOML's flavor at its local batch, seq_len, vocabulary, loss and
compile settings. Writes JSON rows ``{name, source: "trainer" | "bench", tok_per_s, peak_gib}``
with device, date and commit (neollm/provenance.py).

    python tools/bench_trainer.py --config train_configs/neollm_135m.toml --steps 150 \\
        --out benchmarks/trainer_neollm_135m.json -- --training.dataset shards \\
        --training.dataset_path data/shards/wiki_vital_en
    python tools/bench_trainer.py --config train_configs/debug.toml --steps 6 --log-freq 2 --skip 2 \\
        --bench-steps 2 --bench-warmup 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def steady_state(metrics: dict[str, dict[int, float]], skip: int) -> tuple[float, float, int]:
    """(mean tok/s per GPU over the log steps after ``skip``, peak active GiB, intervals used)."""
    tps = {s: v for s, v in metrics.get("throughput(tps)", {}).items() if s > skip}
    if not tps:
        raise RuntimeError(f"metrics.jsonl has no throughput after step {skip}: raise --steps or lower --skip")
    peaks = metrics.get("memory/max_active(GiB)", {}).values()
    return sum(tps.values()) / len(tps), max(peaks, default=float("nan")), len(tps)


def run_trainer(config: str, steps: int, log_freq: int, ngpu: int, overrides: list[str], dump: Path) -> Path:
    cmd = ["./run_train.sh", "--job.config_file", config, "--job.dump_folder", str(dump),
           "--training.steps", str(steps), "--metrics.log_freq", str(log_freq),
           "--checkpoint.no-enable", "--validation.no-enable", *overrides]
    env = {**os.environ, "NGPU": str(ngpu), "PYTHON": sys.executable}
    print("$ " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=REPO, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"the trainer failed (exit {result.returncode}): {' '.join(cmd)}")
    return dump / "metrics.jsonl"


def run_bench(job, flavor: str, steps: int, warmup: int, out: Path) -> list[dict]:
    import torch

    from neollm.data.loader import model_vocab_size

    cmd = [sys.executable, str(REPO / "tools" / "bench.py"), "--configs", flavor,
           "--batch", str(job.training.local_batch_size), "--seq", str(job.training.seq_len),
           "--vocab", str(model_vocab_size(job) or 0), "--steps", str(steps), "--warmup", str(warmup),
           "--loss", getattr(getattr(job, "loss", None), "impl", "auto"), "--json", str(out)]
    if not (job.compile.enable and "model" in job.compile.components):
        cmd.append("--no-compile")
    if not torch.cuda.is_available():
        cmd += ["--device", "cpu"]
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise RuntimeError(f"tools/bench.py failed: {' '.join(cmd)}")
    return json.loads(out.read_text())


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
    p.add_argument("overrides", nargs="*", help="--section.key value overrides for the trainer (after --)")
    opts = p.parse_args(argv)

    import neollm  # noqa: F401
    from neollm.config_check import parse_config
    from neollm.monitor import read_metrics_jsonl
    from neollm.provenance import device_name, git_commit

    job = parse_config(["--job.config_file", opts.config, *opts.overrides])
    flavor = job.model.flavor
    name = opts.name or flavor
    skip = opts.skip or max(opts.log_freq, opts.steps // 5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dump = opts.keep or Path(tmp) / "run"
        metrics = read_metrics_jsonl(run_trainer(opts.config, opts.steps, opts.log_freq, opts.ngpu,
                                                 opts.overrides, dump))
        tps, peak, intervals = steady_state(metrics, skip)
        rows.append({"name": name, "source": "trainer", "tok_per_s": tps * opts.ngpu, "peak_gib": peak,
                     "ngpu": opts.ngpu, "steps": opts.steps, "skipped_steps": skip, "intervals": intervals,
                     "local_batch_size": job.training.local_batch_size, "seq_len": job.training.seq_len})
        if not opts.no_bench:
            for r in run_bench(job, flavor, opts.bench_steps, opts.bench_warmup, Path(tmp) / "bench.json"):
                rows.append({"name": name, "bench_label": r["name"], "source": "bench", "tok_per_s": r["tok_per_s"],
                             "peak_gib": r["peak_gib"], "ngpu": 1, "steps": opts.bench_steps,
                             "local_batch_size": job.training.local_batch_size, "seq_len": job.training.seq_len})
    report = {"device": device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "config": opts.config, "overrides": opts.overrides,
              "command": "python tools/bench_trainer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    print(f"\n{report['device']}, {report['date']}, commit {report['commit']}")
    print("| name | source | GPUs | tok/s | peak GiB |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['source']} | {r['ngpu']} | {r['tok_per_s']:,.0f} | {r['peak_gib']:.2f} |")
    bench = [r for r in rows if r["source"] == "bench"]
    if bench and bench[0]["tok_per_s"] > 0:
        print(f"trainer / bench: {rows[0]['tok_per_s'] / opts.ngpu / bench[0]['tok_per_s']:.1%} (per GPU)")
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
