"""Decoding speed measurements behind tools/bench_generate.py (its docstring describes the modes and
the timing): a randomly initialised flavor, greedy decoding of a fixed count of tokens per mode.
"""

from __future__ import annotations

import time

import torch

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


def compare(flavors: list[str], batches: list[int], prompt: int, new: int, modes: list[str], dtype: str,
            device: torch.device) -> list[dict]:
    """Every mode at every (flavor, batch), one row each, printed as a markdown line when measured
    (tok/s per mode and each mode against ``dynamic``, or the first mode without it)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = "dynamic" if "dynamic" in modes else modes[0]
    others = [m for m in modes if m != base]
    print(f"| flavor | batch | {' | '.join(f'{m} tok/s' for m in modes)} | "
          f"{' | '.join(f'{m} / {base}' for m in others)} |", flush=True)
    print("|---" * (2 + len(modes) + len(others)) + "|", flush=True)
    rows = []
    for flavor in flavors:
        model = build(flavor, device, getattr(torch, dtype))
        for batch in batches:
            speed, setup = {}, {}
            for mode in modes:
                speed[mode], setup[mode] = measure(model, batch, prompt, new, mode, sync)
            rows.append(dict(flavor=flavor, batch=batch, device=str(device), dtype=dtype,
                             prompt=prompt, new=new, tok_s=speed, setup_s=setup))
            print(f"| {flavor} | {batch} | {' | '.join(f'{speed[m]:,.0f}' for m in modes)} | "
                  f"{' | '.join(f'{speed[m] / speed[base]:.1f}x' for m in others)} |", flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    return rows
