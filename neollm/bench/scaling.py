"""Multi-GPU scaling of the real trainer (tools/bench_scaling.py is its command line; its docstring
describes the measurement): the same TOML on 1, 2, ... N processes through ./run_train.sh, each
layout's step time, throughput, memory and losses, written as results.md and results.json.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from neollm.ablation.grid import Variant
from neollm.ablation.runner import RunFailed, run_variant
from neollm.errors import ConfigError
from neollm.monitor import read_metrics_jsonl
from neollm.provenance import device_name, git_commit

TRAIN, TOKENS = "loss_metrics/global_avg_loss", "n_tokens_seen"
STEP_TIME, MEMORY = "time_metrics/end_to_end(s)", "memory/max_reserved(GiB)"


def parse_layout(text: str) -> tuple[int, int]:
    """"N" -> (1 replica, N shards); "RxS" -> (R, S) (HSDP)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] >= 1:
        return 1, parts[0]
    if len(parts) == 2 and min(parts) >= 1:
        return parts[0], parts[1]
    raise ConfigError(f"layout {text!r}: write N (FSDP over N GPUs) or RxS (HSDP, R replicas x S shards)")


def set_key(item: str) -> str:
    """The key of a ``--set section.key=value``, hyphens read as underscores (torchtitan accepts both)."""
    return item.partition("=")[0].replace("-", "_")


def read_batch(config: Path, sets: list[str] = ()) -> tuple[int, int]:
    """(global, local) batch of a TOML's ``[training]`` (torchtitan's defaults when unset), after
    any ``--set training.*_batch_size=N`` (those come last on the command line, so they win)."""
    import tomllib

    training = tomllib.loads(config.read_text()).get("training", {})
    for item in sets:
        key, value = set_key(item), item.partition("=")[2]
        if key in ("training.local_batch_size", "training.global_batch_size"):
            training[key.split(".", 1)[1]] = value
    local = int(training.get("local_batch_size", 8))
    global_ = int(training.get("global_batch_size", -1))
    return (global_ if global_ > 0 else local), local


def read_flavor(config: Path, sets: list[str] = ()) -> str:
    """The TOML's ``[model] flavor`` after any ``--set model.flavor=...`` (the row's ``name``)."""
    import tomllib

    flavor = tomllib.loads(config.read_text()).get("model", {}).get("flavor", "")
    for item in sets:
        if set_key(item) == "model.flavor":
            flavor = item.partition("=")[2]
    return flavor


def parallelism(replicas: int, shards: int) -> str:
    """What the trainer runs for a layout (neollm/parallelize.py): one process, FSDP2 over the shards,
    DDP over replicas that each hold the whole model, or HSDP (replicas of FSDP2 groups)."""
    if replicas * shards == 1:
        return "single"
    if replicas == 1:
        return "fsdp"
    return "ddp" if shards == 1 else "hsdp"


def layout_argv(config: Path, dump: Path, replicas: int, shards: int, steps: int, local_batch: int,
                sets: list[str], checkpoint: tuple[str, ...] = ("--checkpoint.no-enable",)) -> list[str]:
    argv = ["--job.config_file", str(config), "--job.dump_folder", str(dump), "--training.steps", str(steps),
            "--training.local_batch_size", str(local_batch), "--metrics.log_freq", "1",
            "--parallelism.data_parallel_replicate_degree", str(replicas),
            "--parallelism.data_parallel_shard_degree", str(shards),
            "--validation.no-enable", "--monitor.no-technique_scalars", *checkpoint]
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write section.key=value")
        if value.lower() in ("true", "false"):  # torchtitan's boolean flags
            section, _, name = key.rpartition(".")
            argv.append(f"--{key}" if value.lower() == "true" else f"--{section}.no-{name}")
        else:
            argv += [f"--{key}", value]
    return argv


def preflight(name: str, argv: list[str], ngpu: int) -> None:
    """run_train.sh's own checks (config keys, ranges, batch split over the ranks, tokenizer, data)."""
    import neollm  # noqa: F401  (registers the spec and datasets)
    from neollm.config_check import parse_config
    from neollm.preflight import check_run

    try:
        check_run(parse_config(argv), ngpu)
    except (ConfigError, FileNotFoundError) as error:
        raise ConfigError(f"layout {name}: {error}") from None


def make_seed_checkpoint(config: Path, dump: Path, sets: list[str]) -> Path:
    """One process writes the initial weights (``--checkpoint.create_seed_checkpoint``); reused."""
    seed = dump / "checkpoint" / "step-0"
    if (seed / ".metadata").is_file():
        return seed
    argv = layout_argv(config, dump, 1, 1, 1, 1, sets, ("--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
                                                        "--checkpoint.folder", "checkpoint"))
    run_variant(Variant(name="seed", what="seed checkpoint"), dump, argv, 1, "checkpoint",
                lambda d: {}, extra={})
    if not (seed / ".metadata").is_file():
        raise RunFailed(f"no seed checkpoint in {seed}; see {dump}/train.log")
    return seed


def summarize(dump: Path, skip: int) -> dict:
    """A finished layout's numbers from its metrics.jsonl."""
    series = read_metrics_jsonl(dump / "metrics.jsonl")
    tokens, times = series.get(TOKENS, {}), series.get(STEP_TIME, {})
    if not tokens or not times:
        raise ValueError(f"{dump}/metrics.jsonl has no {TOKENS} / {STEP_TIME}: did the run log every step?")
    per_step = max(tokens.values()) / max(tokens)
    timed = [t for s, t in sorted(times.items()) if s > skip]
    if not timed:
        raise ValueError(f"{dump}: no step after --skip {skip} (run more --steps)")
    step_s = statistics.median(timed)
    return {"tokens_per_step": int(per_step), "steps": max(tokens), "timed_steps": len(timed),
            "step_s_median": step_s, "tok_per_s": per_step / step_s,
            "peak_memory_gib": max(series.get(MEMORY, {}).values(), default=None),
            "losses": {str(s): v for s, v in sorted(series.get(TRAIN, {}).items())}}


def compare(results: list[dict], compare_steps: int) -> None:
    """Scaling and loss agreement of every layout against the first one (in place)."""
    base = results[0]
    base_losses = base["losses"]
    for r in results:
        r["speedup"] = r["tok_per_s"] / base["tok_per_s"]
        r["efficiency"] = r["speedup"] / (r["ngpu"] / base["ngpu"])
        r["tok_per_s_per_gpu"] = r["tok_per_s"] / r["ngpu"]
        same_batch = r["tokens_per_step"] == base["tokens_per_step"]
        common = [s for s in r["losses"] if same_batch and s in base_losses and int(s) <= compare_steps]
        diffs = [abs(r["losses"][s] - base_losses[s]) for s in common]
        r["loss_max_abs_diff"] = max(diffs) if diffs else None
        r["loss_steps_compared"] = len(common)


def write_markdown(path: Path, header: dict, results: list[dict]) -> None:
    lines = ["# Scaling", ""] + [f"- {k}: {v}" for k, v in header.items()] + [
        "",
        "| layout | GPUs | micro-batch | tokens/step | step s (median) | tok/s | tok/s per GPU | speedup | "
        "efficiency | peak GiB | max abs loss diff vs first (steps) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        diff = "-" if r["loss_max_abs_diff"] is None else f"{r['loss_max_abs_diff']:.2e} ({r['loss_steps_compared']})"
        lines.append(f"| {r['layout']} | {r['ngpu']} | {r['local_batch']} | {r['tokens_per_step']:,} | "
                     f"{r['step_s_median']:.4f} | {r['tok_per_s']:,.0f} | {r['tok_per_s_per_gpu']:,.0f} | "
                     f"{r['speedup']:.2f}x | {r['efficiency']:.0%} | {mem} | {diff} |")
    path.write_text("\n".join(lines) + "\n")


def run_layouts(opts) -> tuple[list[dict], int]:
    """Run (or pick up from an earlier invocation) every layout of ``opts`` (tools/bench_scaling.py's
    parsed arguments); every layout's config is checked before the first one trains.
    Returns (one result per layout, the global batch of the last layout).
    Raises ConfigError, FileNotFoundError, RunFailed or ValueError with a one-line message."""
    if not opts.config.is_file():
        raise ConfigError(f"--config {opts.config} does not exist")
    if opts.steps <= opts.skip:
        raise ConfigError(f"--steps {opts.steps} must be larger than --skip {opts.skip}")
    if opts.local_batch and any(set_key(item) == "training.local_batch_size" for item in opts.set):
        raise ConfigError("give the micro-batch once: --local-batch or --set training.local_batch_size")
    if opts.batch_per_gpu is not None:
        if opts.batch_per_gpu <= 0:
            raise ConfigError(f"--batch-per-gpu must be positive, got {opts.batch_per_gpu}")
        if any(set_key(item) == "training.global_batch_size" for item in opts.set):
            raise ConfigError("--batch-per-gpu sets each layout's global batch: drop --set training.global_batch_size")
    layouts = [(text.strip(), *parse_layout(text.strip())) for text in opts.layouts.split(",") if text.strip()]
    global_batch, config_local = read_batch(opts.config, opts.set)
    runs = []
    for name, replicas, shards in layouts:
        ngpu = replicas * shards
        sets = opts.set
        if opts.batch_per_gpu is not None:
            global_batch = opts.batch_per_gpu * ngpu
            sets = [*opts.set, f"training.global_batch_size={global_batch}"]
        if global_batch % ngpu:
            raise ConfigError(f"layout {name}: the global batch {global_batch} does not divide over {ngpu} ranks")
        local = opts.local_batch or min(config_local, global_batch // ngpu)
        checkpoint = (("--checkpoint.enable", "--checkpoint.interval", str(opts.steps + 1),
                       "--checkpoint.folder", "checkpoint") if opts.seed_checkpoint
                      else ("--checkpoint.no-enable",))
        args = layout_argv(opts.config, opts.out / name, replicas, shards, opts.steps, local, sets, checkpoint)
        preflight(name, args, ngpu)  # every layout's config checked before the first one trains
        runs.append((name, replicas, shards, ngpu, local, global_batch, args))
    seed = make_seed_checkpoint(opts.config, opts.out / "seed", opts.set) if opts.seed_checkpoint else None
    flavor = read_flavor(opts.config, opts.set)
    mode = "strong" if opts.batch_per_gpu is None else "weak"
    results = []
    for name, replicas, shards, ngpu, local, layout_global, args in runs:
        dump = opts.out / name
        if seed is not None and not (dump / "result.json").is_file():
            shutil.rmtree(dump / "checkpoint", ignore_errors=True)  # an interrupted run starts over
            shutil.copytree(seed, dump / "checkpoint" / "step-0")
        variant = Variant(name=name, what=f"{replicas} x {shards} (replicas x shards)")
        print(f"[scaling] {name}: NGPU={ngpu}, micro-batch {local} -> {dump}/train.log", flush=True)
        result, _ = run_variant(variant, dump, args, ngpu, "checkpoint",
                                lambda d: summarize(d, opts.skip),
                                extra={"name": flavor, "mode": mode, "layout": name, "gpus": ngpu, "ngpu": ngpu,
                                       "parallelism": parallelism(replicas, shards), "local_batch": local,
                                       "global_batch": layout_global,
                                       "git_commit": git_commit(), "device": device_name()})
        # a layout finished by an earlier invocation: its numbers again, with this --skip
        results.append({**result, **summarize(dump, opts.skip)})
    return results, global_batch


def write_results(opts, results: list[dict], global_batch: int, command: str) -> str:
    """Compare the layouts' losses, write results.md and results.json into ``opts.out``; returns
    results.md's text."""
    compare(results, opts.compare_steps)
    header = {"command": command,
              "config": str(opts.config), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "git commit": git_commit(), "device": device_name(),
              "global batch": (global_batch if opts.batch_per_gpu is None
                               else f"{opts.batch_per_gpu} sequences per GPU (weak scaling)"),
              "steps": opts.steps, "step time": f"median over steps > {opts.skip}"}
    opts.out.mkdir(parents=True, exist_ok=True)
    write_markdown(opts.out / "results.md", header, results)
    (opts.out / "results.json").write_text(json.dumps({"header": header, "results": results}, indent=2, default=str))
    return (opts.out / "results.md").read_text()
