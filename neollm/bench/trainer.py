"""The real trainer's throughput beside tools/bench.py's (tools/bench_trainer.py is the command line;
its docstring describes the measurement): one ``./run_train.sh`` run read back from its
metrics.jsonl, then tools/bench.py as a subprocess at the TOML's settings, as report rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from neollm.bench import trace
from neollm.config_check import parse_config
from neollm.errors import ConfigError
from neollm.monitor import read_metrics_jsonl
from neollm.provenance import REPO, record


PROFILED_STEPS = 3  # torch.profiler's warm-up step and two active ones, the run's last


def steady_state(metrics: dict[str, dict[int, float]], skip: int,
                 until: int | None = None) -> tuple[float, float, int]:
    """(mean tok/s per GPU over the log steps after ``skip`` and up to ``until``, peak active GiB,
    intervals used)."""
    tps = {s: v for s, v in metrics.get("throughput(tps)", {}).items() if s > skip and (until is None or s <= until)}
    if not tps:
        raise RuntimeError(f"metrics.jsonl has no throughput after step {skip}"
                           + (f" up to step {until} (the profiled steps left out)" if until is not None else "")
                           + ": raise --steps or lower --skip")
    peaks = metrics.get("memory/max_active(GiB)", {}).values()
    return sum(tps.values()) / len(tps), max(peaks, default=float("nan")), len(tps)


def first_step_seconds(metrics: dict[str, dict[int, float]], tokens_per_gpu_step: int) -> float | None:
    """Step 1's duration, compile and autotune included: its tokens over its logged throughput (tokens
    per second per GPU since the trainer started timing); None if step 1 was not logged."""
    tps = metrics.get("throughput(tps)", {}).get(1)
    return tokens_per_gpu_step / tps if tps else None


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


def profile_overrides(steps: int) -> list[str]:
    """torchtitan's [profiling] for one trace of the run's last PROFILED_STEPS steps (its schedule waits
    profile_freq - warm-up - active steps, then records; the trace is written at step profile_freq)."""
    if steps < PROFILED_STEPS:
        raise ConfigError(f"--profile needs --steps >= {PROFILED_STEPS}")
    return ["--profiling.enable_profiling", "--profiling.save_traces_folder", "profile_traces",
            "--profiling.profile_freq", str(steps), "--profiling.profiler_warmup", "1",
            "--profiling.profiler_active", str(PROFILED_STEPS - 1)]


def bench_command(job, flavor: str, steps: int, warmup: int, out: Path) -> list[str]:
    """tools/bench.py's command line for ``flavor`` at the job's batch, sequence, vocabulary, loss and
    compile settings (backend, mode, scope: CUDA graphs on both sides or neither)."""
    import torch

    from neollm.data.loader import model_vocab_size

    cmd = [sys.executable, str(REPO / "tools" / "bench.py"), "--configs", flavor,
           "--batch", str(job.training.local_batch_size), "--seq", str(job.training.seq_len),
           "--vocab", str(model_vocab_size(job) or 0), "--steps", str(steps), "--warmup", str(warmup),
           "--loss", getattr(getattr(job, "loss", None), "impl", "auto"), "--json", str(out)]
    if job.compile.enable and "model" in job.compile.components:
        cmd += ["--compile-backend", job.compile.backend, "--compile-mode", job.compile.mode,
                "--compile-scope", job.compile.scope]
    else:
        cmd.append("--no-compile")
    if not torch.cuda.is_available():
        cmd += ["--device", "cpu"]
    return cmd


def run_bench(job, flavor: str, steps: int, warmup: int, out: Path) -> list[dict]:
    """tools/bench.py (a subprocess: its own compile state) as ``bench_command`` says; its JSON rows."""
    cmd = bench_command(job, flavor, steps, warmup, out)
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise RuntimeError(f"tools/bench.py failed: {' '.join(cmd)}")
    return json.loads(out.read_text())["rows"]


def measure(opts, command: str) -> dict:
    """The report of tools/bench_trainer.py's ``opts``: provenance and the rows (trainer first)."""
    job = parse_config(["--job.config_file", opts.config, *opts.overrides])
    flavor = job.model.flavor
    name = opts.name or flavor
    skip = opts.skip or max(opts.log_freq, opts.steps // 5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(opts.keep).resolve() if opts.keep else Path(tmp) / "run"  # the trainer runs in REPO
        if (dump / "metrics.jsonl").exists():
            raise ConfigError(f"--keep {dump} already holds a run's metrics.jsonl, which this run would "
                              "append to: name a new folder or delete it")
        profile = opts.profile
        overrides = [*opts.overrides, *(profile_overrides(opts.steps) if profile else [])]
        metrics = read_metrics_jsonl(run_trainer(opts.config, opts.steps, opts.log_freq, opts.ngpu, overrides, dump))
        tps, peak, intervals = steady_state(metrics, skip, opts.steps - PROFILED_STEPS if profile else None)
        batch = job.training.global_batch_size
        batch = batch if batch > 0 else job.training.local_batch_size * opts.ngpu  # -1: one micro-batch per GPU
        step_tokens = batch * job.training.seq_len // opts.ngpu
        first = first_step_seconds(metrics, step_tokens)
        rows.append({"name": name, "source": "trainer", "tok_per_s": tps * opts.ngpu, "peak_gib": peak,
                     "first_step_s": None if first is None else round(first, 1),
                     "ngpu": opts.ngpu, "steps": opts.steps, "skipped_steps": skip, "intervals": intervals,
                     "local_batch_size": job.training.local_batch_size, "seq_len": job.training.seq_len})
        if profile:
            # torch.profiler attached from the first step slows the steps it does not record too
            # (H100, neollm_135m at micro-batch 64: 159k tok/s against 291k without; BENCHMARKS.md,
            # twentieth session): this tok/s is not the trainer's speed.
            rows[-1]["profiler_attached"] = True
            rows[-1]["profile"] = trace.summarize(trace.load_events(trace.latest_trace(dump / "profile_traces")))
        if not opts.no_bench:
            for r in run_bench(job, flavor, opts.bench_steps, opts.bench_warmup, Path(tmp) / "bench.json"):
                rows.append({"name": name, "bench_label": r["name"], "source": "bench", "tok_per_s": r["tok_per_s"],
                             "peak_gib": r["peak_gib"], "first_step_s": r.get("first_step_s"), "ngpu": 1, "steps": opts.bench_steps,
                             "local_batch_size": job.training.local_batch_size, "seq_len": job.training.seq_len})
    return {**record(), "config": opts.config, "overrides": opts.overrides, "command": command, "rows": rows}


def summary(report: dict, ngpu: int) -> str:
    """The report as printed: provenance, a markdown table, and the trainer's share of bench's tok/s."""
    rows = report["rows"]
    env = " ".join(f"{k}={v}" for k, v in report.get("environment", {}).items())
    lines = [f"\n{report['device']}, {report['date']}, commit {report['commit']}" + (f", {env}" if env else ""),
             "| name | source | GPUs | tok/s | peak GiB | first step s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        first = r.get("first_step_s")
        attached = " (profiler attached: not the trainer's speed, time it without --profile)" \
            if r.get("profiler_attached") else ""
        lines.append(f"| {r['name']} | {r['source']} | {r['ngpu']} | {r['tok_per_s']:,.0f}{attached} | {r['peak_gib']:.2f} | "
                     f"{'' if first is None else first} |")
    lines += [trace.text(r["profile"]) for r in rows if r.get("profile")]
    bench = [r for r in rows if r["source"] == "bench"]
    if bench and bench[0]["tok_per_s"] > 0:
        lines.append(f"trainer / bench: {rows[0]['tok_per_s'] / ngpu / bench[0]['tok_per_s']:.1%} (per GPU)")
    return "\n".join(lines)
