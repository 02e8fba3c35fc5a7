"""Tokens per second each data source delivers, beside what a model consumes on this GPU.

Each source goes through the trainer's own dataloader (neollm/data/throughput.py): the TOML's
tokenizer, seq_len, local batch and ``[training.dataloader]`` settings (``--workers`` overrides
num_workers). The consumption is ``--consume`` tok/s, or the row of ``--bench-json`` (the JSON
of tools/bench.py or tools/bench_trainer.py) named like the TOML's flavor; a source below
``--margin`` x the consumption is marked: it would make the GPU wait.

    python tools/bench_data.py --config train_configs/neollm_135m.toml \\
        --sources wiki_vital_en,shards=data/shards/wiki_vital_en,local_text='my_corpus/*.jsonl' \\
        --bench-json benchmarks/bench.json
    python tools/bench_data.py --config train_configs/debug.toml --sources wiki_vital_en --consume 5000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


from neollm.errors import ConfigError


def consumption(opts, flavor: str) -> tuple[float | None, str]:
    if opts.consume:
        return opts.consume, "--consume"
    if opts.bench_json:
        data = json.loads(Path(opts.bench_json).read_text())
        rows = data["rows"] if isinstance(data, dict) else data
        # bench_trainer names rows by flavor; tools/bench.py as "<flavor> V=<vocab>[ settings]"
        named = [r for r in rows if r.get("name") == flavor or str(r.get("name", "")).startswith(f"{flavor} V=")]
        trainer = [r for r in named if r.get("source") == "trainer"]
        row = (trainer or named or [None])[0]
        if row is None:
            raise ConfigError(f"--bench-json {opts.bench_json} has no row named {flavor!r} "
                              f"(names: {sorted({r.get('name') for r in rows})})")
        return float(row["tok_per_s"]), f"{opts.bench_json} ({row.get('source', 'bench')})"
    return None, ""


def parse_sources(text: str) -> list[tuple[str, str | None]]:
    out = []
    for item in text.split(","):
        if item.strip():
            name, eq, path = item.strip().partition("=")
            out.append((name, path if eq else None))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="train_configs/neollm_135m.toml")
    p.add_argument("--sources", default="wiki_vital_en",
                   help="comma list of [training] dataset names, each optionally =dataset_path")
    p.add_argument("--workers", type=int, default=None, help="override [training.dataloader] num_workers")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--consume", type=float, default=0.0, help="tok/s the model consumes (one GPU)")
    p.add_argument("--bench-json", help="tools/bench.py --json or tools/bench_trainer.py output")
    p.add_argument("--margin", type=float, default=1.5, help="sources below margin x consumption are flagged")
    p.add_argument("--json", type=Path)
    p.add_argument("overrides", nargs="*", help="--section.key value overrides of the TOML")
    opts = p.parse_args(argv)

    import neollm  # noqa: F401
    from neollm.config_check import parse_config
    from neollm.data.throughput import measure_source
    from neollm.provenance import device_name, record

    try:
        job = parse_config(["--job.config_file", opts.config, *opts.overrides])
        need, where = consumption(opts, job.model.flavor)
        rows = []
        for name, path in parse_sources(opts.sources):
            speed = measure_source(job, name, path, opts.batches, opts.warmup, opts.workers)
            rows.append(speed)
            print(f"{name}: {speed.tok_per_s:,.0f} tok/s ({speed.workers} workers)", flush=True)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\n{job.model.flavor} at {job.training.local_batch_size} x {job.training.seq_len}"
          + (f" consumes {need:,.0f} tok/s (from {where})" if need else "") + f"; device: {device_name()}")
    print("| source | path | workers | tok/s | x consumption |")
    print("|---|---|---:|---:|---|")
    for r in rows:
        ratio = f"{r.tok_per_s / need:.2f}x" + (" (GPU would wait)" if r.tok_per_s < opts.margin * need else "") \
            if need else "-"
        print(f"| {r.source} | {r.path or '(default)'} | {r.workers} | {r.tok_per_s:,.0f} | {ratio} |")
    if opts.json:
        opts.json.write_text(json.dumps({**record(), "config": opts.config, "overrides": opts.overrides,
                                         "consume_tok_per_s": need, "consume_from": where,
                                         "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
