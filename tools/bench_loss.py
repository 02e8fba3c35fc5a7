"""Loss + head cost: Cut Cross-Entropy vs compiled logits + cross-entropy vs our chunked paths.

Times forward + backward of the loss from the final hidden states [batch * seq, dim] and the tied
head weight [vocab, dim] (bf16, gradients to both), and the peak memory it adds above its inputs,
for each vocabulary. One process, one device, every method side by side.

    python tools/bench_loss.py --vocabs 64402,151665 --batch 64 --seq 512 --dim 512
    python tools/bench_loss.py --vocabs 64402,151680 --chunk-kernel   # the softmax step alone

``--chunk-kernel`` times only the fused loss's per-chunk softmax / gradient step on [4,096 x
vocab padded to 64] bf16 logits: the compiled torch function against the Triton kernel
(neollm/loss/kernel.py) at several launch shapes, with their largest differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from neollm.bench.loss import chunk_kernel_table, method_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", default="64402,151665")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--methods", default="",
                   help="comma list of substrings: only the methods whose name contains one (default all)")
    p.add_argument("--chunk-kernel", action="store_true",
                   help="time only the per-chunk softmax step: compiled torch vs the Triton kernel")
    p.add_argument("--json", type=Path)
    opts = p.parse_args(argv)
    wanted = [m for m in opts.methods.split(",") if m]
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (Cut Cross-Entropy is Triton)")
    # fused's compiled chunk function is specialised per (chunk shape, vocab): 4 variants a vocabulary
    # here (2 chunk sizes, padded or not), which past dynamo's default 8 would fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    vocabs = (int(v) for v in opts.vocabs.split(","))  # parsed as they are measured
    if opts.chunk_kernel:
        rows = chunk_kernel_table(vocabs)
    else:
        rows = method_table(vocabs, opts.batch, opts.seq, opts.dim, opts.steps, opts.warmup, wanted)
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
