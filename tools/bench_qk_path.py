"""The attention's q/k path (SeeDNorm -> RoPE -> momentum) on the GPU: the unfused PyTorch reference
(eager, torch.compile'd) against the fused Triton op (neollm/kernels/qk_path.py), forward and
forward + backward of one layer's q and k, at neollm_135m's shape by default (64 x 512 tokens, H 8 /
Hkv 4, d 64, bf16, momentum 0.1 zero-started). Prints a markdown table of ms, peak memory and relative
differences from the eager reference; the code is neollm/bench/qk_path.py.

    python tools/bench_qk_path.py
    python tools/bench_qk_path.py --momentum-first repeat --json qk_path.json
    python tools/bench_qk_path.py --block-t 16,32,64,128     # the Triton path at each BLOCK_T
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from neollm.bench.launch_sweep import power_of_two_list


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--heads", type=int, default=8, help="query heads H")
    p.add_argument("--kv-heads", type=int, default=4, help="key heads Hkv")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--momentum-gamma", type=float, default=0.1, help="0: no momentum")
    p.add_argument("--momentum-first", choices=("zero", "repeat"), default="zero")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--block-t", metavar="N,N,...", type=power_of_two_list,
                   help="time the Triton path at each of these tokens per program (default: qk_path.BLOCK_T)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from neollm.bench.qk_path import rows_for, table

    results = rows_for(args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim, getattr(torch, args.dtype),
                       args.momentum_gamma, args.momentum_first, args.steps, args.block_t)
    print(f"{torch.cuda.get_device_name()}, {args.batch} x {args.seq_len} tokens, H {args.heads} / Hkv "
          f"{args.kv_heads}, d {args.head_dim}, {args.dtype}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
