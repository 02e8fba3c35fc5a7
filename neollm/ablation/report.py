"""Results of an ablation grid: per-run numbers from metrics.jsonl, results.md/json and three plots.

Keys read from ``metrics.jsonl`` (neollm/monitor.py writes torchtitan's logged dicts):
``validation_metrics/loss``, ``loss_metrics/global_avg_loss``, ``n_tokens_seen`` (global, all
ranks), ``throughput(tps)`` (tokens/s per device), ``memory/max_reserved(GiB)``. A step logged
twice (a resumed run repeats the steps after its checkpoint) keeps its last value.

Every variant is judged against the reference (the base config, or "plain" in add-one mode) by
the rules in neollm/ablation/stats.py: quality at equal tokens (delta of the final validation
loss against the reference's seed noise) and value at equal training seconds (tokens / tok/s).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from neollm.ablation import stats
from neollm.ablation.runner import variant_group, write_atomic
from neollm.monitor import read_metrics_jsonl

VAL, TRAIN = "validation_metrics/loss", "loss_metrics/global_avg_loss"
TOKENS, TPS, MEMORY = "n_tokens_seen", "throughput(tps)", "memory/max_reserved(GiB)"

RULE = ("noise rule: s = standard deviation of the reference's final val loss over its n seeds; a "
        "delta is real when |delta| > t(0.975, dof) * se, se = s * sqrt(1 + 1/n) (dof n - 1) for a "
        "one-seed variant, pooled s_p * sqrt(1/n + 1/m) (dof n + m - 2) for m seeds; otherwise "
        "'within noise'. With one reference seed nothing is called real")
TIME_RULE = ("time rule: training seconds = tokens / tok/s (compile and validation excluded); "
             "delta at equal time = variant minus reference validation loss at the shorter run's "
             "training time (linear interpolation on each curve), judged by the same threshold; the "
             "slower run is then compared mid-schedule, which is not where a whole schedule of that length "
             "ends (at these budgets mid-schedule was lower: docs/ablations.md); --equal-time trains whole schedules")


def summarize(dump: Path) -> dict:
    """A finished run's numbers (validation loss curve against tokens seen)."""
    series = read_metrics_jsonl(dump / "metrics.jsonl")
    val, tokens = series.get(VAL, {}), series.get(TOKENS, {})
    if not val:
        raise ValueError(f"{dump}/metrics.jsonl has no {VAL}: is [validation] enabled?")
    if not tokens:
        raise ValueError(f"{dump}/metrics.jsonl has no {TOKENS}")
    per_step = max(tokens.values()) / max(tokens)  # the same number of tokens every step
    curve = [[step, step * per_step, val[step]] for step in sorted(val)]
    tps = [v for s, v in sorted(series.get(TPS, {}).items()) if s > 1] or list(series.get(TPS, {}).values())
    train = series.get(TRAIN, {})
    return {
        "final_step": max(tokens),
        "tokens": int(max(tokens) * per_step),
        "final_val_loss": curve[-1][2],
        "final_val_step": curve[-1][0],
        "best_val_loss": min(p[2] for p in curve),
        "final_train_loss": train[max(train)] if train else None,
        "tps_median": statistics.median(tps) if tps else None,
        "peak_memory_gib": max(series.get(MEMORY, {}).values(), default=None),
        "val_curve": curve,
    }


def run_tps(run: dict) -> float | None:
    """Tokens per second of the whole run (all its processes)."""
    tps = run.get("tps_median")
    return None if not tps else tps * run.get("processes", 1)


def train_seconds(run: dict) -> float | None:
    """The run's training seconds: its tokens over its tok/s (compile and validation excluded)."""
    tps = run_tps(run)
    return run["tokens"] / tps if tps else None


def seconds_curve(run: dict) -> list[tuple[float, float]] | None:
    """(training seconds, val loss): tokens / the run's tok/s at every validation point."""
    tps = run_tps(run)
    return None if tps is None else [(tokens / tps, loss) for _, tokens, loss in run["val_curve"]]


def _mean_curve(runs: list[dict]) -> list[tuple[float, float]] | None:
    """The seed-averaged (seconds, loss) curve of one group (steps common to all its runs)."""
    curves = [seconds_curve(r) for r in runs]
    if any(c is None for c in curves):
        return None
    steps = set.intersection(*({p[0] for p in r["val_curve"]} for r in runs))
    by_step = [{p[0]: (s, p[2]) for p, s in zip(r["val_curve"], (c[0] for c in curve))}
               for r, curve in zip(runs, curves)]
    return [(statistics.fmean(b[step][0] for b in by_step), statistics.fmean(b[step][1] for b in by_step))
            for step in sorted(steps)]


def grid_speeds(folder: Path) -> tuple[dict[str, float], str]:
    """({group: mean training steps per second over its finished runs}, the reference's group) of a
    grid's results.json, for ``ablate --equal-time`` (steps, not tokens, so a variant with another
    batch is scaled right); refused when a run shared its GPU (its speed is not its own)."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: give the folder of a grid that has finished runs")
    runs = _recorded_runs(json.loads(path.read_text()))
    shared = sorted(r["variant"]["name"] for r in runs if (r.get("runs_sharing_gpu") or 1) > 1)
    if shared:
        raise ValueError(f"{path}: {', '.join(shared)} shared a GPU, so their tok/s are not their own speeds: "
                         "take the speeds from a grid run with --parallel 1")
    refs = {variant_group(r) for r in runs if r["variant"]["reference"]}
    if len(refs) != 1:
        raise ValueError(f"{path}: no finished reference run to scale the others' speeds by")

    def steps_per_s(r: dict) -> float | None:
        tps = run_tps(r)
        return tps * r["final_step"] / r["tokens"] if tps and r.get("tokens") and r.get("final_step") else None

    speeds = {name: statistics.fmean(steps_per_s(r) for r in group) for name, group in _groups(runs).items()
              if all(steps_per_s(r) for r in group)}
    ref = refs.pop()
    if ref not in speeds:
        raise ValueError(f"{path}: the reference {ref} has no measured speed (tok/s) to scale the others' by")
    return speeds, ref


def _groups(results: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(variant_group(r), []).append(r)
    return groups


def significance(results: list[dict]) -> dict:
    """The reference's mean and seed noise; per run its delta, per group the verdicts."""
    ref_runs = [r for r in results if r["variant"]["reference"]]
    if not ref_runs:
        raise ValueError("no finished reference run to compare against")
    ref = [r["final_val_loss"] for r in ref_runs]
    mean = statistics.fmean(ref)
    sd = statistics.stdev(ref) if len(ref) > 1 else None
    ref_curve = _mean_curve(ref_runs)
    ref_tps = [run_tps(r) for r in ref_runs]
    ref_tps_mean = statistics.fmean(ref_tps) if all(ref_tps) else None
    rows, verdicts = {}, {}
    for name, runs in _groups(results).items():
        if runs[0]["variant"]["reference"]:
            for r in runs:
                rows[r["variant"]["name"]] = {"delta": r["final_val_loss"] - mean, "significant": "reference"}
            continue
        losses = [r["final_val_loss"] for r in runs]
        delta = statistics.fmean(losses) - mean
        noise = stats.noise_threshold(ref, losses)
        threshold = noise["threshold"] if noise else None
        if any(r.get("same_network_as_reference") for r in runs):
            quality = "no-op: same network as the reference (a noise control)"
        else:
            quality = stats.quality_verdict(delta, threshold)
        tps = [run_tps(r) for r in runs]
        curve = _mean_curve(runs)
        verdict = {"runs": len(runs), "delta": delta, "threshold": threshold, "quality": quality,
                   "tok_s": statistics.fmean(tps) if all(tps) else None,
                   "peak_memory_gib": max((r.get("peak_memory_gib") or 0 for r in runs), default=None) or None,
                   "time_per_token_vs_ref": None, "delta_equal_time": None, "equal_time_s": None,
                   "time": "speed unknown"}
        if curve and ref_curve and ref_tps_mean:
            equal = stats.equal_time_delta(curve, ref_curve)
            shared = _sharing(runs + ref_runs) > 1  # a speed measured beside other runs is not its own
            verdict.update(time_per_token_vs_ref=ref_tps_mean / verdict["tok_s"],
                           delta_equal_time=equal["delta"], equal_time_s=equal["seconds"],
                           time="time not judged (runs shared a GPU)" if shared
                           else stats.time_verdict(equal["delta"], threshold))
        verdict["reading"] = stats.technique_reading(name, quality, verdict["time"])
        # how many seeds a side would tell a delta of this size from noise
        verdict["seeds_to_resolve"] = stats.required_seeds(delta, sd) if sd and quality == "within noise" else None
        verdicts[name] = verdict
        for r in runs:
            rows[r["variant"]["name"]] = {"delta": r["final_val_loss"] - mean, "significant": quality}
    return {"reference_mean": mean, "reference_seeds": len(ref), "sd": sd,
            "spread": max(ref) - min(ref) if len(ref) > 1 else None, "rows": rows, "verdicts": verdicts}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _sharing(results: list[dict]) -> int:
    return max((r.get("runs_sharing_gpu") or 1 for r in results), default=1)


def _resolve_hint(verdict: dict) -> str:
    """For a delta within noise: the seeds a side that would resolve one of its size (stats.required_seeds)."""
    if verdict.get("quality") != "within noise" or not verdict.get("delta"):
        return ""
    n = verdict.get("seeds_to_resolve")
    return (f"; {n} seeds a side would resolve a delta of {verdict['delta']:+.3f}" if n
            else f"; a delta of {verdict['delta']:+.3f} is below what 64 seeds a side resolve")


EQUAL_TIME_TOLERANCE = 0.10


def off_equal_time(results: list[dict]) -> list[tuple[str, float, float]]:
    """Runs of an --equal-time grid whose training seconds (tokens / tok/s) miss the reference's mean by
    more than EQUAL_TIME_TOLERANCE: (name, seconds, reference seconds). The steps came from another
    grid's speeds; a run slowed here (a busy host, another kernel choice) breaks the premise silently."""
    ref = [s for r in results if r["variant"].get("reference") and (s := train_seconds(r))]
    if not ref:
        return []
    mean = statistics.mean(ref)
    return [(r["variant"]["name"], s, mean) for r in results
            if not r["variant"].get("reference") and (s := train_seconds(r))
            and abs(s / mean - 1) > EQUAL_TIME_TOLERANCE]


def write_markdown(path: Path, header: dict, results: list[dict], sig: dict, missing: list[str]) -> None:
    lines = ["# Ablation results", ""]
    equal_time = "equal time" in header  # an --equal-time grid: each variant the reference's seconds, whole schedules
    lines += [f"- {key}: `{value}`" if key in ("command", "config", "git commit") else f"- {key}: {value}"
              for key, value in header.items()]
    sd, spread = sig["sd"], sig["spread"]
    lines += [f"- reference: mean final val loss {sig['reference_mean']:.4f} over {sig['reference_seeds']} "
              "seed(s); " + (f"seed standard deviation {sd:.4f}, spread (max - min) {spread:.4f}"
                             if sd is not None else "seed noise unknown (one seed: run --seeds 0,1,2)"),
              f"- {RULE}", f"- {TIME_RULE}"]
    shared = _sharing(results)
    if shared > 1:
        lines.append(f"- up to {shared} runs shared one GPU: tok/s and the time axis are not each variant's "
                     "own speed (run with --parallel 1 for equal-time verdicts)")
    lines += ["", "## Runs", "",
              "| variant | what changed | seed | params | tokens | final val loss | best val loss | delta vs ref "
              "| tok/s | train s | peak mem GiB | runs on its GPU |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        v, row = r["variant"], sig["rows"][r["variant"]["name"]]
        tps = run_tps(r)
        lines.append(
            f"| {v['name']} | {v['what']} | {v['seed']} | {r['params']:,} | {r['tokens']:,} | "
            f"{r['final_val_loss']:.4f} | {r['best_val_loss']:.4f} | {row['delta']:+.4f} | "
            f"{_fmt(tps, ',.0f')} | {_fmt(train_seconds(r), ',.0f')} | "
            f"{_fmt(r['peak_memory_gib'], '.2f')} | {r.get('runs_sharing_gpu') or 1} |")
    if sig["verdicts"]:
        delta_label = "delta at equal time (whole schedules)" if equal_time else "delta at equal tokens"
        lines += ["", "## Verdicts", "",
                  f"| variant | seeds | {delta_label} | noise threshold | quality | time per token vs ref "
                  "| peak mem GiB | delta at equal time (s) | time |",
                  "|---|---:|---:|---:|---|---:|---:|---:|---|"]
        for name, v in sig["verdicts"].items():
            lines.append(
                f"| {name} | {v['runs']} | {v['delta']:+.4f} | {_fmt(v['threshold'], '.4f')} | {v['quality']} | "
                f"{_fmt(v['time_per_token_vs_ref'], '.2f')}x | {_fmt(v['peak_memory_gib'], '.2f')} | "
                f"{_fmt(v['delta_equal_time'], '+.4f')} ({_fmt(v['equal_time_s'], ',.0f')}) | {v['time']} |")
        lines += ["", "One line per technique:", ""] + [f"- {v['reading']}" + _resolve_hint(v)
                                                       for v in sig["verdicts"].values()]
    if equal_time and (off := off_equal_time(results)):
        lines += ["", "Off equal time (training seconds more than "
                  f"{EQUAL_TIME_TOLERANCE:.0%} from the reference's mean: this run's speed is not the one the "
                  "source grid measured, so its steps do not fill the reference's seconds; the delta at whole "
                  "schedules still compares the planned steps):", ""]
        lines += [f"- {name}: {s:,.0f} s against {ref:,.0f} s ({s / ref:.2f}x)" for name, s, ref in off]
    if missing:
        lines += ["", f"Not finished yet (rerun the same command to continue): {', '.join(missing)}"]
    lines += ["", "Plots: val_loss.png (validation loss vs tokens), val_loss_time.png (vs training seconds), "
              f"delta.png ({'final deltas' if equal_time else 'deltas at equal tokens'} and at equal "
              "time; shaded: the noise threshold of a "
              "one-seed variant).", ""]
    path.write_text("\n".join(lines))


def _curves_plot(out: Path, name: str, results: list[dict], x_of, xlabel: str, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors: dict[str, str] = {}
    for r in results:
        v = r["variant"]
        xs = x_of(r)
        if xs is None:
            continue
        curve = r["val_curve"]
        color = colors.setdefault(v["group"], f"C{len(colors) % 10}")
        ax.plot(xs, [p[2] for p in curve], color=color,
                linestyle="--" if v["name"] != v["group"] else "-", linewidth=2 if v["reference"] else 1.2,
                marker="o" if len(curve) < 30 else None, markersize=3,
                label=v["name"] + (" (reference)" if v["reference"] and v["name"] == v["group"] else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return out / name


def plot(out: Path, results: list[dict], sig: dict, equal_time: bool = False) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [_curves_plot(out, "val_loss.png", results, lambda r: [p[1] for p in r["val_curve"]],
                            "tokens seen", "validation loss vs tokens")]
    shared = _sharing(results)
    written.append(_curves_plot(
        out, "val_loss_time.png", results,
        lambda r: [s for s, _ in seconds_curve(r)] if seconds_curve(r) else None,
        "training seconds (tokens / tok/s)",
        "validation loss vs training time" + (f" (up to {shared} runs shared a GPU)" if shared > 1 else "")))

    names = list(sig["verdicts"])
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 2), 4.5))
    one_seed = [v["threshold"] for v in sig["verdicts"].values() if v["runs"] == 1 and v["threshold"]]
    if one_seed:
        ax.axhspan(-one_seed[0], one_seed[0], color="grey", alpha=0.25,
                   label=f"noise threshold ±{one_seed[0]:.4f} (one-seed variant)")
    width = 0.4
    tokens = [sig["verdicts"][n]["delta"] for n in names]
    timed = [sig["verdicts"][n]["delta_equal_time"] for n in names]
    ax.bar([i - width / 2 for i in range(len(names))], tokens, width,
           color=["tab:red" if d > 0 else "tab:green" for d in tokens],
           label="final (equal time, whole schedules)" if equal_time else "at equal tokens")
    if any(d is not None for d in timed):
        ax.bar([i + width / 2 for i in range(len(names))], [d or 0.0 for d in timed], width, color="none",
               edgecolor=["tab:red" if (d or 0) > 0 else "tab:green" for d in timed], hatch="//",
               label="at equal training time")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("val loss - reference (lower is better)")
    ax.set_title("delta vs reference")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "delta.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def write_report(out: Path, header: dict, results: list[dict], missing: list[str]) -> list[Path]:
    """results.json, results.md, val_loss.png, val_loss_time.png, delta.png under ``out``."""
    sig = significance(results)
    write_atomic(out / "results.json", json.dumps(
        {"header": header, "rules": {"noise": RULE, "time": TIME_RULE},
         "reference": {k: sig[k] for k in ("reference_mean", "reference_seeds", "sd", "spread")},
         "verdicts": sig["verdicts"],
         "runs": [{**r, **sig["rows"][r["variant"]["name"]]} for r in results], "missing": missing},
        indent=2, default=str))
    tmp = out / f".results.md.tmp{os.getpid()}"
    write_markdown(tmp, header, results, sig, missing)
    tmp.replace(out / "results.md")
    return [out / "results.json", out / "results.md", *plot(out, results, sig, "equal time" in header)]


def rejudge(folder: Path) -> list[Path]:
    """Rewrite a grid's results.md/json and plots from its results.json alone (e.g. after a
    change of the rules; the run folders need not exist). Runs written before the report
    recorded GPU sharing take it from the header's "runs at once"."""
    folder = Path(folder)
    data = json.loads((folder / "results.json").read_text())
    return write_report(folder, data["header"], _recorded_runs(data), data.get("missing", []))


def rereference(folder: Path, name: str, out: Path) -> list[Path]:
    """A grid's report re-read against another of its variants (``name``, e.g. one with three seeds) as the
    reference, written under ``out`` from ``folder``'s results.json alone: the deltas between two
    variants by the same noise rule, without retraining."""
    folder, out = Path(folder), Path(out)
    data = json.loads((folder / "results.json").read_text())
    runs = _recorded_runs(data)
    groups = {variant_group(r) for r in runs}
    if name not in groups:
        raise ValueError(f"{folder}: no variant {name!r} to take as the reference; variants: {sorted(groups)}")
    for run in runs:
        run["variant"] = {**run["variant"], "reference": variant_group(run) == name}
    out.mkdir(parents=True, exist_ok=True)
    header = {**data["header"], "reference variant": f"{name} (re-read from {folder}/results.json)"}
    return write_report(out, header, runs, data.get("missing", []))


def _recorded_runs(data: dict) -> list[dict]:
    """A results.json's runs without their verdict fields; runs written before the report recorded
    GPU sharing take it from the header's "runs at once"."""
    shared = str(data.get("header", {}).get("runs at once", "1")).split()[0]
    runs = []
    for run in data["runs"]:
        run = {k: v for k, v in run.items() if k not in ("delta", "significant")}
        if "runs_sharing_gpu" not in run and shared.isdigit():
            run["runs_sharing_gpu"] = int(shared)
        runs.append(run)
    return runs


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m neollm.ablation.report",
        description="Rewrite each grid's results.md/json and plots from its results.json; with --reference, "
                    "write one grid's report against another of its variants into --out instead.")
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--reference", metavar="VARIANT", help="the variant to compare the others against")
    parser.add_argument("--out", type=Path, help="where the re-referenced report goes (with --reference)")
    args = parser.parse_args()
    if args.reference and (args.out is None or len(args.folders) != 1):
        parser.error("--reference takes one grid folder and an --out folder")
    try:
        for folder in args.folders:
            written = rereference(folder, args.reference, args.out) if args.reference else rejudge(folder)
            print("\n".join(str(p) for p in written))
    except ValueError as error:
        sys.exit(f"error: {error}")
