"""Decoding speed: cached (KV cache + Gated DeltaNet state) vs uncached (full forward per token).

Randomly initialised flavors (speed does not depend on the weights), greedy decoding of
``--new`` tokens after a ``--prompt``-token prompt, for each batch size, side by side in one
process on the current device. EOS never stops a sequence, so every run decodes the same count.

    python tools/bench_generate.py --flavors neollm_135m,neollm_110m_hybrid --batches 1,16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import neollm  # noqa: F401
from neollm.generate import SamplingConfig, generate
from neollm.model.args import FLAVORS
from neollm.model.model import NeoLLM


def build(flavor: str, device: torch.device, dtype: torch.dtype) -> NeoLLM:
    with torch.device("meta"):
        model = NeoLLM(FLAVORS[flavor])
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    return model.to(dtype).eval()


def tokens_per_second(model: NeoLLM, batch: int, prompt: int, new: int, use_cache: bool, sync) -> float:
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.model_args.vocab_size, (batch, prompt), generator=gen).tolist()
    cfg = SamplingConfig(max_new_tokens=new, temperature=0.0, use_cache=use_cache)
    generate(model, prompts, cfg, max_new_tokens=min(new, 4))  # warm-up (kernels, autotune)
    sync()
    start = time.perf_counter()
    out = generate(model, prompts, cfg)
    sync()
    assert all(len(o) == new for o in out)
    return batch * new / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavors", default="neollm_135m,neollm_110m_hybrid")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    opts = p.parse_args(argv)
    device = torch.device(opts.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    print("| flavor | batch | cached tok/s | uncached tok/s | speed-up |\n|---|---|---|---|---|", flush=True)
    for flavor in opts.flavors.split(","):
        model = build(flavor, device, getattr(torch, opts.dtype))
        for batch in (int(b) for b in opts.batches.split(",")):
            cached = tokens_per_second(model, batch, opts.prompt, opts.new, True, sync)
            uncached = tokens_per_second(model, batch, opts.prompt, opts.new, False, sync)
            rows.append(dict(flavor=flavor, batch=batch, cached=cached, uncached=uncached))
            print(f"| {flavor} | {batch} | {cached:,.0f} | {uncached:,.0f} | {cached / uncached:.1f}x |", flush=True)
        del model
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
