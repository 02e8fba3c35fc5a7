"""Optimizer step time on a flavor's real parameter set: AdamW vs AdEMAMix vs Conda.

The model's parameters (fp32, on the device) get random gradients; each optimizer is built with
NeoLLM's parameter groups (no decay on norms, gains, biases) and stepped ``--steps`` times after
``--warmup``. Conda recomputes each matrix's SVD basis every ``update_proj_gap`` steps: its table
shows a plain step and a step that refreshes the bases separately (the SVDs one by one on the device,
batched by shape, or on the host's CPU threads: ``[optimizer] conda_basis``), and its batched step with the
projections' products in TF32 (``[optimizer] conda_precision = "tf32"``). ``--vocab`` sets the
embedding's rows (the ablation TOML trains 64,402; the flavors' default is Qwen3's full vocabulary).

    python tools/bench_optim.py --flavor neollm_135m --vocab 64402 --json benchmarks/optim.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import neollm  # noqa: F401
from neollm.model.args import FLAVORS
from neollm.model.model import NeoLLM
from neollm.optim.ademamix import AdEMAMix
from neollm.optim.conda import Conda
from neollm.optim.param_groups import build_param_groups
from neollm.provenance import record, tool_command


def candidates(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "AdamW (fused)": lambda g: torch.optim.AdamW(g, lr=6e-4, fused=cuda),
        "AdamW (foreach)": lambda g: torch.optim.AdamW(g, lr=6e-4, foreach=True),
        "AdEMAMix (foreach)": lambda g: AdEMAMix(g, lr=6e-4, betas=(0.9, 0.999, 0.999), alpha=5.0,
                                                  t_alpha=5000, t_beta3=5000, foreach=True),
        # the two step paths named explicitly: the default batches on CUDA only
        "Conda batched (foreach, no SVD)": lambda g: Conda(g, lr=6e-4, update_proj_gap=10**9, foreach=True),
        "Conda batched, TF32 products (no SVD)": lambda g: Conda(g, lr=6e-4, update_proj_gap=10**9, foreach=True,
                                                                 precision="tf32"),
        "Conda per tensor (for-loop, no SVD)": lambda g: Conda(g, lr=6e-4, update_proj_gap=10**9, foreach=False),
        "Conda (SVD refresh every step)": lambda g: Conda(g, lr=6e-4, update_proj_gap=1),
        # the refresh's SVDs batched by shape, or on the host's CPU threads ([optimizer] conda_basis)
        "Conda (SVD refresh every step, svd-batched)": lambda g: Conda(g, lr=6e-4, update_proj_gap=1,
                                                                      basis="svd-batched"),
        "Conda (SVD refresh every step, svd-cpu)": lambda g: Conda(g, lr=6e-4, update_proj_gap=1, basis="svd-cpu"),
    }


def time_steps(optimizer, params, steps: int, warmup: int, sync) -> float:
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start = time.perf_counter()
        optimizer.step()
    sync()
    return (time.perf_counter() - start) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="neollm_135m", choices=sorted(FLAVORS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--vocab", type=int, help="embedding rows (default: the flavor's vocabulary)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    opts = p.parse_args(argv)
    device = torch.device(opts.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.device("meta"):
        args = FLAVORS[opts.flavor]
        model = NeoLLM(dataclasses.replace(args, vocab_size=opts.vocab) if opts.vocab else args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    total = sum(p.numel() for p in params)
    rows = []
    print(f"{opts.flavor}: {total:,} parameters in {len(params)} tensors on {device}")
    print("| optimizer | step ms |\n|---|---|", flush=True)
    for name, make in candidates(device).items():
        optimizer = make(build_param_groups(model, weight_decay=0.1))
        # "SVD every step" needs the steps to count from the start so each refresh happens.
        ms = time_steps(optimizer, params, opts.steps, opts.warmup, sync)
        rows.append(dict(optimizer=name, step_ms=ms))
        print(f"| {name} | {ms:.2f} |", flush=True)
        del optimizer
    if opts.json:
        opts.json.write_text(json.dumps(dict(record(), flavor=opts.flavor, parameters=total,
                                             command=tool_command("bench_optim.py", argv),
                                             rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
