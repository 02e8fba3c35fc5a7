"""PolyNorm GLU product on the GPU: the unfused PyTorch reference (eager, torch.compile'd) against the
fused Triton op (neollm/kernels/polynorm_glu.py), forward and forward + backward, plain and exclusive,
at neollm_135m's shape by default (64 * 512 rows, F 1536, bf16). Prints a markdown table of ms, peak
memory and relative differences from the eager reference; the code is neollm/bench/polynorm.py.

    python tools/bench_polynorm.py
    python tools/bench_polynorm.py --rows 32768 --hidden 1536 --json polynorm.json
    python tools/bench_polynorm.py --simplenorm   # g, u raw + SimpleNorm gains: norms apart vs folded in
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64 * 512, help="batch * sequence (default 64 * 512)")
    p.add_argument("--hidden", type=int, default=1536, help="F, the MLP hidden size")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--simplenorm", action="store_true",
                   help="raw g, u with SimpleNorm gains (neollm_135m's MLP): the norms compiled apart vs folded in")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from neollm.bench.polynorm import rows_for, table
    from neollm.provenance import record, tool_command

    results = []
    for exclusive in (False, True):
        results += rows_for(args.rows, args.hidden, getattr(torch, args.dtype), exclusive, args.steps, args.simplenorm)
    print(f"{torch.cuda.get_device_name()}, rows {args.rows}, F {args.hidden}, {args.dtype}")
    print(table(results))
    if args.json:
        command = tool_command("bench_polynorm.py", argv)
        args.json.write_text(json.dumps({**record(), "command": command, "rows": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
