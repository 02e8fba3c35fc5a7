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
from pathlib import Path

import torch

from neollm.bench.decoding import MODES, compare


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
    rows = compare(opts.flavors.split(","), [int(b) for b in opts.batches.split(",")], opts.prompt, opts.new,
                   modes, opts.dtype, device)
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
