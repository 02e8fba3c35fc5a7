"""Decoding speed: uncached (full forward per token) and cached decoding in each of its modes.

Randomly initialised flavors (speed does not depend on the weights), greedy decoding of
``--new`` tokens after a ``--prompt``-token prompt, for each batch size, side by side in one
process on the current device. EOS never stops a sequence, so every run decodes the same count.
Modes (``--modes``, neollm/inference/decoder.py): ``uncached``; ``dynamic`` (``forward_step`` per
token, the cache's original path); ``eager`` (the static-shape step without a graph);
``cuda_graph`` (the static step captured once, replayed per token); ``compile`` (torch.compile +
CUDA graph). Default: uncached,dynamic,cuda_graph,compile on CUDA, uncached,dynamic,eager on CPU.

Each mode first runs once untimed: the static modes with the same sizes, so their decoder (its
CUDA graph, compiled step) is built there and reused by the timed run through a DecoderPool
(``setup s`` in the JSON: that first run, capture / compilation included); uncached and dynamic
with 4 new tokens (kernel warm-up). tok/s = batch * new / (prefill + decode time).

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
from neollm.inference import DecoderPool, SamplingConfig, generate
from neollm.model.args import FLAVORS
from neollm.model.model import NeoLLM

MODES = ("uncached", "dynamic", "eager", "cuda_graph", "compile")


def build(flavor: str, device: torch.device, dtype: torch.dtype) -> NeoLLM:
    with torch.device("meta"):
        model = NeoLLM(FLAVORS[flavor])
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    return model.to(dtype).eval()


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure(model: NeoLLM, batch: int, prompt: int, new: int, mode: str, sync) -> tuple[float, float]:
    """(tokens per second, seconds of the untimed first run)."""
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.model_args.vocab_size, (batch, prompt), generator=gen).tolist()
    cfg = SamplingConfig(max_new_tokens=new, temperature=0.0, use_cache=mode != "uncached",
                         decode_mode="dynamic" if mode == "uncached" else mode)
    pool = DecoderPool()
    first_new = new if mode in ("eager", "cuda_graph", "compile") else min(new, 4)
    setup = timed(lambda: generate(model, prompts, cfg, max_new_tokens=first_new, decoders=pool), sync)
    out = []
    seconds = timed(lambda: out.extend(generate(model, prompts, cfg, decoders=pool)), sync)
    assert all(len(o) == new for o in out)
    return batch * new / seconds, setup


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavors", default="neollm_135m,neollm_110m_hybrid")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    opts = p.parse_args(argv)
    device = torch.device(opts.device)
    cuda = device.type == "cuda"
    modes = (opts.modes or ("uncached,dynamic,cuda_graph,compile" if cuda else "uncached,dynamic,eager")).split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = "dynamic" if "dynamic" in modes else modes[0]
    others = [m for m in modes if m != base]
    print(f"| flavor | batch | {' | '.join(f'{m} tok/s' for m in modes)} | "
          f"{' | '.join(f'{m} / {base}' for m in others)} |", flush=True)
    print("|---" * (2 + len(modes) + len(others)) + "|", flush=True)
    rows = []
    for flavor in opts.flavors.split(","):
        model = build(flavor, device, getattr(torch, opts.dtype))
        for batch in (int(b) for b in opts.batches.split(",")):
            speed, setup = {}, {}
            for mode in modes:
                speed[mode], setup[mode] = measure(model, batch, opts.prompt, opts.new, mode, sync)
            rows.append(dict(flavor=flavor, batch=batch, device=str(device), dtype=opts.dtype,
                             prompt=opts.prompt, new=opts.new, tok_s=speed, setup_s=setup))
            print(f"| {flavor} | {batch} | {' | '.join(f'{speed[m]:,.0f}' for m in modes)} | "
                  f"{' | '.join(f'{speed[m] / speed[base]:.1f}x' for m in others)} |", flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
