"""Attention-kernel pieces on the GPU, side by side: SDPA backends and LUCID's preconditioner precision.

1. SDPA: forward + backward of causal GQA attention at NeoLLM's shape through each backend alone
   (cuDNN, FlashAttention-2, memory-efficient), and through ``causal_attention`` (NeoLLM's call:
   PyTorch's own choice), with q, k, v laid out as the model makes them ([B, T, heads, d] transposed). A backend that
   cannot take the inputs is reported as such.
2. LUCID: ``X = P^-1 V`` with the key Gram matrix formed as a bf16 GEMM (what a matmul does inside
   an autocast region) or in fp32 (NeoLLM's preconditioner), against an fp64 reference, for independent keys and for correlated
   keys (a shared direction plus noise, so that P has entries near 1), and the time of NeoLLM's
   ``lucid_values`` forward + backward (eager, bf16 autocast, one layer).
3. LUCID's op (``--lucid-op``): ``lucid_values`` forward and forward + backward with the Triton
   kernels (neollm/kernels/lucid.py) and with the PyTorch reference (P formed in HBM, cuBLAS
   triangular solves: the path before the kernels), each with its error against fp64 (bf16 inputs,
   bf16 autocast, correlated keys) and peak memory; then the kernels' launch configurations
   (rows per block, column chunk, warps, programs per head; IEEE or TF32 dots in the solve) side by side.
4. LUCID's key gradient (``--lucid-key-grad-only``): ``lucid.key_grad`` alone (X and dV solved once by
   the default kernels) at each launch (rows per block, column chunk, warps, software-pipelining stages),
   its time and its dK error against fp64: its programs are independent, so its tiles are chosen apart
   from the substitutions'. Seconds per configuration.

``--lucid-op-only`` and ``--lucid-key-grad-only`` pick parts 3 and 4 (both flags: both); neither: all four.

    python tools/bench_attention.py --json out.json
    python tools/bench_attention.py --lucid-op-only --json lucid.json
    python tools/bench_attention.py --lucid-key-grad-only --lucid-key-grad-configs "32,64,4,3;64,64,8,3"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from neollm.bench import attention
from neollm.provenance import record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lucid-op-only", action="store_true", help="only part 3 (LUCID's op and kernel configurations)")
    p.add_argument("--lucid-configs", metavar="R,C,W,S;...",
                   help="only these launch configurations (rows, column chunk, warps, programs per head) "
                        "in part 3, e.g. '32,64,4,1' (default: the whole sweep, minutes)")
    p.add_argument("--lucid-variants", metavar="DOTS:DIAGONAL[:SOLVE],...",
                   help="only these (products, diagonal step, solve) variants, e.g. "
                        "'tf32x3:substitute,tf32x3:inverse,tf32x3:inverse:lookback' (solve default: walk)")
    p.add_argument("--lucid-key-grad-only", action="store_true",
                   help="only part 4 (the key-gradient kernel's launch configurations; with --lucid-op-only: 3 and 4)")
    p.add_argument("--lucid-key-grad-configs", metavar="R,C,W,S;...",
                   help="only these key-gradient launches (rows, column chunk, warps, stages) in part 4, "
                        "e.g. '32,64,4,3;64,64,8,3' (default: the whole sweep)")
    p.add_argument("--json", type=Path)
    opts = p.parse_args(argv)
    try:
        configs = None if opts.lucid_configs is None else attention.parse_lucid_configs(opts.lucid_configs)
        variants = None if opts.lucid_variants is None else attention.parse_lucid_variants(opts.lucid_variants)
        key_grad_configs = (None if opts.lucid_key_grad_configs is None
                            else attention.parse_lucid_key_grad_configs(opts.lucid_key_grad_configs))
    except ValueError as err:
        p.error(str(err))
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py times GPU kernels: no CUDA device is visible")
    every_part = not (opts.lucid_op_only or opts.lucid_key_grad_only)
    shape = (opts.batch, opts.seq, opts.kv_heads, opts.head_dim)
    result = dict(record(), torch=torch.__version__)
    if every_part:
        result.update(attention.sdpa_and_lucid(opts.batch, opts.seq, opts.heads, opts.kv_heads, opts.head_dim))
        print(attention.markdown(result))

    def show(part: dict) -> None:
        result.update(part)
        print(attention.markdown(part))

    if every_part or opts.lucid_op_only:
        show(attention.lucid_op(*shape, configs, variants))
    if every_part or opts.lucid_key_grad_only:
        show(attention.lucid_key_grad(*shape, key_grad_configs))
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
