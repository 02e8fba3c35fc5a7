"""A run's metrics as PNG curves (tools/plot_run.py is the command line): read from NeoLLM's
metrics.jsonl or torchtitan's tensorboard events; for a step logged more than once the last value wins.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from neollm.monitor import read_metrics_jsonl as read_jsonl

Series = dict[str, dict[int, float]]  # tag -> step -> value


def read_tensorboard(folder: Path) -> Series:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: Series = defaultdict(dict)
    files = sorted(folder.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    for file in files:  # oldest first, so a resumed run's values win
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                series[tag][int(event.step)] = float(event.value)
    return series


def load(source: Path) -> Series:
    """A run's series from ``metrics.jsonl`` (a file, or in the folder ``source``), else from the
    tensorboard event files under it; FileNotFoundError when there are neither."""
    if source.is_file():
        if source.suffix == ".jsonl":
            return read_jsonl(source)
        return read_tensorboard(source.parent)
    if (source / "metrics.jsonl").is_file():
        return read_jsonl(source / "metrics.jsonl")
    series = read_tensorboard(source)
    if not series:
        raise FileNotFoundError(f"no metrics.jsonl or tensorboard event files under {source}: "
                                "give a run's dump folder (set [metrics] enable_tensorboard = true or keep "
                                "[monitor] jsonl = true)")
    return series


def _plot(ax, series: Series, tags: list[str], labels: list[str] | None = None) -> bool:
    drawn = False
    for i, tag in enumerate(tags):
        points = series.get(tag)
        if not points:
            continue
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], label=(labels or tags)[i],
                marker="o" if len(steps) < 30 else None, markersize=3)
        drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    return drawn


def plot(series: Series, out: Path, title: str = "") -> list[Path]:
    """loss / lr / throughput / grad_norm / techniques PNGs of the series present, into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "loss": (["loss_metrics/global_avg_loss", "validation_metrics/loss"], ["train loss", "validation loss"], "loss"),
        "lr": (["lr"], ["learning rate"], "LR"),
        "throughput": (["throughput(tps)"], ["tokens/s per device"], "tokens/s"),
        "grad_norm": (["grad_norm"], ["grad norm"], "grad norm"),
    }
    written = []
    for name, (tags, labels, ylabel) in figures.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        if _plot(ax, series, tags, labels):
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title} {name}".strip())
            if name == "throughput" and series.get("mfu(%)"):
                ax2 = ax.twinx()
                steps = sorted(series["mfu(%)"])
                ax2.plot(steps, [series["mfu(%)"][s] for s in steps], color="tab:red", alpha=0.6, label="MFU %")
                ax2.set_ylabel("MFU %")
            fig.tight_layout()
            path = out / f"{name}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    technique_tags = sorted(t for t in series if t.startswith("techniques/"))
    if technique_tags:
        fig, ax = plt.subplots(figsize=(8, 5))
        _plot(ax, series, technique_tags, [t.removeprefix("techniques/") for t in technique_tags])
        ax.set_title(f"{title} technique scalars".strip())
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = out / "techniques.png"
        fig.savefig(path, dpi=110)
        written.append(path)
        plt.close(fig)
    return written
