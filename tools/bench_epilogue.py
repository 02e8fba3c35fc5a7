"""The attention epilogue (XSA, directional routing, output gate) on the GPU: the unfused PyTorch
reference (eager, torch.compile'd) against the fused Triton op (neollm/kernels/attention_epilogue.py),
forward and forward + backward, at neollm_135m's shape by default (64 * 512 tokens, 8 heads over 4 KV
heads, d 64, 4 directions, bf16). Prints a markdown table of ms, peak memory and relative differences
from the eager reference; the code is neollm/bench/epilogue.py.

    python tools/bench_epilogue.py
    python tools/bench_epilogue.py --tokens 32768 --json epilogue.json
    python tools/bench_epilogue.py --block-n 16,32,64 --warps 2,4,8   # the Triton path at each launch
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
    p.add_argument("--tokens", type=int, default=64 * 512, help="batch * sequence (default 64 * 512)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--directions", type=int, default=4)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--block-n", metavar="N,N,...", type=power_of_two_list,
                   help="time the Triton path at each of these tokens per program (attention_epilogue.BLOCK_N)")
    p.add_argument("--warps", metavar="W,W,...", type=power_of_two_list,
                   help="... and at each of these warps per program (attention_epilogue.NUM_WARPS)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from neollm.bench.epilogue import rows_for, table

    results = rows_for(args.tokens, args.heads, args.kv_heads, args.head_dim, args.directions,
                       getattr(torch, args.dtype), args.steps, args.block_n, args.warps)
    print(f"{torch.cuda.get_device_name()}, tokens {args.tokens}, heads {args.heads}/{args.kv_heads}, "
          f"d {args.head_dim}, K {args.directions}, {args.dtype}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
