"""Results of an ablation grid: per-run numbers from metrics.jsonl, results.md/json and two plots.

Keys read from ``metrics.jsonl`` (neollm/monitor.py writes torchtitan's logged dicts):
``validation_metrics/loss``, ``loss_metrics/global_avg_loss``, ``n_tokens_seen`` (global, all
ranks), ``throughput(tps)`` (tokens/s per device), ``memory/max_reserved(GiB)``. A step logged
twice (a resumed run repeats the steps after its checkpoint) keeps its last value.

Significance: the reference (the base config, or "plain" in add-one mode) is repeated with
several ``[debug] seed`` values; their spread (max - min of the final validation loss) is the
noise of changing only the initialisation. A difference vs the reference mean is marked
significant only when it is larger than that spread; with one reference seed the spread is
unknown and nothing is called significant.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from neollm.monitor import read_metrics_jsonl

VAL, TRAIN = "validation_metrics/loss", "loss_metrics/global_avg_loss"
TOKENS, TPS, MEMORY = "n_tokens_seen", "throughput(tps)", "memory/max_reserved(GiB)"


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


def significance(results: list[dict]) -> dict:
    """The reference's mean final validation loss and seed spread; delta and verdict per run."""
    ref = [r["final_val_loss"] for r in results if r["variant"]["reference"]]
    if not ref:
        raise ValueError("no finished reference run to compare against")
    mean = statistics.fmean(ref)
    spread = max(ref) - min(ref) if len(ref) > 1 else None
    rows = {}
    for r in results:
        delta = r["final_val_loss"] - mean
        if r["variant"]["reference"]:
            verdict = "reference"
        elif r.get("same_network_as_reference"):
            verdict = "no-op: same network as the reference (a noise control)"
        elif spread is None:
            verdict = "spread unknown"
        else:
            verdict = "yes" if abs(delta) > spread else "no"
        rows[r["variant"]["name"]] = {"delta": delta, "significant": verdict}
    return {"reference_mean": mean, "reference_seeds": len(ref), "spread": spread, "rows": rows}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_markdown(path: Path, header: dict, results: list[dict], sig: dict, missing: list[str]) -> None:
    lines = ["# Ablation results", ""]
    lines += [f"- {key}: `{value}`" if key in ("command", "config", "git commit") else f"- {key}: {value}"
              for key, value in header.items()]
    spread = sig["spread"]
    lines += [f"- reference: mean final val loss {sig['reference_mean']:.4f} over "
              f"{sig['reference_seeds']} seed(s); seed spread (max - min) "
              + (f"{spread:.4f}" if spread is not None else "unknown (one seed: run --seeds 0,1,2)"),
              "- significant?: |delta| > seed spread of the reference (otherwise inside the noise of init)",
              ""]
    lines += ["| variant | what changed | seed | params | tokens | final val loss | best val loss | "
              "delta vs ref | significant? | tok/s/device | peak mem GiB |",
              "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        v, row = r["variant"], sig["rows"][r["variant"]["name"]]
        lines.append(
            f"| {v['name']} | {v['what']} | {v['seed']} | {r['params']:,} | {r['tokens']:,} | "
            f"{r['final_val_loss']:.4f} | {r['best_val_loss']:.4f} | {row['delta']:+.4f} | "
            f"{row['significant']} | {_fmt(r['tps_median'], ',.0f')} | {_fmt(r['peak_memory_gib'], '.2f')} |")
    if missing:
        lines += ["", f"Not finished yet (rerun the same command to continue): {', '.join(missing)}"]
    lines += ["", "Plots: val_loss.png (validation loss vs tokens), delta.png (final val loss minus the "
              "reference mean; shaded: the reference's seed spread).", ""]
    path.write_text("\n".join(lines))


def plot(out: Path, results: list[dict], sig: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    colors: dict[str, str] = {}
    for r in results:
        v = r["variant"]
        curve = r["val_curve"]
        color = colors.setdefault(v["group"], f"C{len(colors) % 10}")
        ax.plot([p[1] for p in curve], [p[2] for p in curve], color=color,
                linestyle="--" if v["name"] != v["group"] else "-", linewidth=2 if v["reference"] else 1.2,
                marker="o" if len(curve) < 30 else None, markersize=3,
                label=v["name"] + (" (reference)" if v["reference"] and v["name"] == v["group"] else ""))
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss vs tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "val_loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    others = [r for r in results if not r["variant"]["reference"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(others) + 2), 4.5))
    names = [r["variant"]["name"] for r in others]
    deltas = [sig["rows"][n]["delta"] for n in names]
    if sig["spread"] is not None:
        ax.axhspan(-sig["spread"], sig["spread"], color="grey", alpha=0.25,
                   label=f"reference seed spread ±{sig['spread']:.4f}")
    ax.bar(range(len(names)), deltas, color=["tab:red" if d > 0 else "tab:green" for d in deltas])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("final val loss - reference (lower is better)")
    ax.set_title("delta vs reference")
    ax.grid(alpha=0.3, axis="y")
    if sig["spread"] is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "delta.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def write_report(out: Path, header: dict, results: list[dict], missing: list[str]) -> list[Path]:
    """results.json, results.md, val_loss.png, delta.png under ``out``."""
    sig = significance(results)
    (out / "results.json").write_text(json.dumps(
        {"header": header, "reference": {k: sig[k] for k in ("reference_mean", "reference_seeds", "spread")},
         "runs": [{**r, **sig["rows"][r["variant"]["name"]]} for r in results], "missing": missing},
        indent=2, default=str))
    write_markdown(out / "results.md", header, results, sig, missing)
    return [out / "results.json", out / "results.md", *plot(out, results, sig)]
