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

    python tools/bench_attention.py --json out.json
    python tools/bench_attention.py --lucid-op-only --json lucid.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


from neollm.kernels import lucid as lucid_kernels
from neollm.model import attention_ops as ops


def time_ms(fn, steps: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def sdpa_rows(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)

    def leaf(h: int) -> torch.Tensor:  # [B, T, h, d] projection layout, seen as [B, h, T, d]
        x = torch.randn(batch, seq, h, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        return x.requires_grad_(True)

    q, k, v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
    grad = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)

    def run(backends, expand: bool = False):
        kk, vv = k.transpose(1, 2), v.transpose(1, 2)
        if expand:
            kk = kk.repeat_interleave(heads // kv_heads, dim=1)
            vv = vv.repeat_interleave(heads // kv_heads, dim=1)
        with sdpa_kernel(backends, set_priority=True):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), kk, vv, is_causal=True, enable_gqa=not expand and kv_heads != heads)
        torch.autograd.grad(out, (q, k, v), grad)
        return out

    reference = run([SDPBackend.FLASH_ATTENTION]).float()
    cases = [("flash", [SDPBackend.FLASH_ATTENTION], False), ("cudnn", [SDPBackend.CUDNN_ATTENTION], False),
             ("cudnn, k/v expanded to all heads", [SDPBackend.CUDNN_ATTENTION], True),
             ("memory-efficient", [SDPBackend.EFFICIENT_ATTENTION], False)]
    rows = []
    for name, backends, expand in cases:
        try:
            out = run(backends, expand).float()
            ms = time_ms(lambda: run(backends, expand))
            rows.append(dict(case=name, ms=ms, max_diff_vs_flash=float((out - reference).abs().max())))
        except RuntimeError as err:
            rows.append(dict(case=name, ms=None, error=str(err).splitlines()[0][:120]))
    def neollm_order():
        out = ops.causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        torch.autograd.grad(out, (q, k, v), grad)

    rows.append(dict(case="causal_attention (PyTorch's choice)", ms=time_ms(neollm_order)))
    return rows


def lucid_rows(batch: int, seq: int, kv_heads: int, head_dim: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for keys in ("independent", "correlated"):
        k = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", generator=g)
        if keys == "correlated":
            shared = torch.randn(batch, kv_heads, 1, head_dim, device="cuda", generator=g)
            k = shared + 0.3 * k
        k = k.to(torch.bfloat16)
        v = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", generator=g).to(torch.bfloat16)
        p64 = ops.lucid_preconditioner(k.double(), 1e-6)
        x64 = torch.linalg.solve_triangular(p64, v.double(), upper=False, unitriangular=True)
        kr = ops.rms_normalize(k, 1e-6).to(torch.bfloat16)  # what autocast hands a GEMM
        gram_bf16 = (kr @ kr.mT).float()                    # bf16 output, as under autocast
        p_bf16 = torch.exp(gram_bf16 / head_dim ** 0.5 - head_dim ** 0.5).tril()
        for gram, p in (("bf16 GEMM (autocast)", p_bf16), ("fp32 (NeoLLM)", ops.lucid_preconditioner(k, 1e-6))):
            x = torch.linalg.solve_triangular(p, v.float(), upper=False, unitriangular=True).double()
            rows.append(dict(keys=keys, gram=gram, rel_err_x=float((x - x64).norm() / x64.norm()),
                             p_offdiag_max=float(p64.tril(-1).max())))
        leaf = k.clone().requires_grad_(True)

        def step(leaf=leaf, v=v):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ops.lucid_values(leaf, v, 1e-6).float().sum().backward()

        rows[-1]["fwd_bwd_ms"] = time_ms(step, steps=10, warmup=3)
    return rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def lucid_op_rows(batch: int, seq: int, kv_heads: int, head_dim: int) -> list[dict]:
    """lucid_values with impl "triton" and "torch": time, peak memory and error vs fp64."""
    g = torch.Generator(device="cuda").manual_seed(2)
    shape = (batch, seq, kv_heads, head_dim)  # the projection layout, seen as [B, Hkv, T, d]
    k = torch.randn(batch, 1, kv_heads, head_dim, device="cuda", generator=g) + 0.2 * torch.randn(
        *shape, device="cuda", generator=g)
    k = k.to(torch.bfloat16).transpose(1, 2)
    v = torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    dx = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", generator=g).to(torch.bfloat16)

    def run(impl, kk, vv, backward=True):
        kk, vv = kk.detach().requires_grad_(backward), vv.detach().requires_grad_(backward)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=kk.dtype != torch.float64):
            x = ops.lucid_values(kk, vv, 1e-6, impl=impl)
        return (x, *torch.autograd.grad(x, (kk, vv), dx.to(x.dtype))) if backward else (x,)

    want = run("torch", k.double(), v.double())
    rows = []
    for impl in ("torch", "triton"):
        got = run(impl, k, v)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(impl, k, v)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append(dict(impl=impl, fwd_ms=time_ms(lambda: run(impl, k, v, backward=False)),
                         fwd_bwd_ms=time_ms(lambda: run(impl, k, v)), peak_mib=peak,
                         **{f"rel_err_{n}": _rel(a, b) for n, a, b in zip(("x", "dk", "dv"), got, want)}))
    return rows


# (rows per block, column chunk, warps, programs per head in the substitutions)
LUCID_CONFIGS = [(64, 64, 4, 1), (64, 64, 8, 1), (64, 64, 4, 2), (64, 64, 4, 4), (32, 64, 4, 1), (32, 64, 4, 2),
                 (32, 32, 4, 4), (16, 64, 4, 1), (16, 64, 2, 4), (16, 32, 2, 2), (128, 64, 8, 2)]


def lucid_config_rows(batch: int, seq: int, kv_heads: int, head_dim: int) -> list[dict]:
    """The kernels alone on fp32 normalised keys at each launch configuration, IEEE and TF32 solve."""
    g = torch.Generator(device="cuda").manual_seed(3)
    k = torch.randn(batch, kv_heads, 1, head_dim, device="cuda", generator=g) + 0.2 * torch.randn(
        batch, kv_heads, seq, head_dim, device="cuda", generator=g)
    kr = ops.rms_normalize(k, 1e-6)
    v = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", generator=g).to(torch.bfloat16)
    dx = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", generator=g)
    x64 = lucid_kernels.solve_reference(kr.double(), v.double())
    dk64, dv64 = lucid_kernels.solve_backward_reference(kr.double(), x64, dx.double())
    rows = []
    for rows_, cols, warps, split in LUCID_CONFIGS:
        for tf32 in (False, True):
            launch = dict(block_rows=rows_, block_cols=cols, num_warps=warps, value_split=split)
            try:
                x = lucid_kernels.solve_kernel(kr, v, solve_tf32=tf32, **launch)
                dk, dv = lucid_kernels.solve_backward_kernel(kr, x, dx, solve_tf32=tf32, **launch)
                rows.append(dict(
                    **launch, solve_tf32=tf32,
                    fwd_ms=time_ms(lambda: lucid_kernels.solve_kernel(kr, v, solve_tf32=tf32, **launch)),
                    bwd_ms=time_ms(lambda: lucid_kernels.solve_backward_kernel(kr, x, dx, solve_tf32=tf32, **launch)),
                    rel_err_x=_rel(x, x64), rel_err_dk=_rel(dk, dk64), rel_err_dv=_rel(dv, dv64)))
            except Exception as err:  # noqa: BLE001 - a configuration that does not compile is a result
                rows.append(dict(**launch, solve_tf32=tf32, error=str(err).splitlines()[0][:120]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lucid-op-only", action="store_true", help="only part 3 (LUCID's op and kernel configurations)")
    p.add_argument("--json", type=Path)
    opts = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py times GPU kernels: no CUDA device is visible")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    if not opts.lucid_op_only:
        result["sdpa"] = sdpa_rows(opts.batch, opts.seq, opts.heads, opts.kv_heads, opts.head_dim)
        result["lucid"] = lucid_rows(opts.batch, opts.seq, opts.kv_heads, opts.head_dim)
        print("| SDPA fwd+bwd | ms | max diff vs flash |\n|---|---:|---:|")
        for r in result["sdpa"]:
            ms = "n/a: " + r["error"] if r.get("ms") is None else f"{r['ms']:.3f}"
            print(f"| {r['case']} | {ms} | {r.get('max_diff_vs_flash', float('nan')):.2e} |")
        print("\n| LUCID keys | Gram | rel. error of X vs fp64 | max off-diagonal P | fwd+bwd ms |\n|---|---|---:|---:|---:|")
        for r in result["lucid"]:
            ms = f"{r['fwd_bwd_ms']:.2f}" if "fwd_bwd_ms" in r else ""
            print(f"| {r['keys']} | {r['gram']} | {r['rel_err_x']:.2e} | {r['p_offdiag_max']:.3f} | {ms} |")
    result["lucid_op"] = lucid_op_rows(opts.batch, opts.seq, opts.kv_heads, opts.head_dim)
    result["lucid_configs"] = lucid_config_rows(opts.batch, opts.seq, opts.kv_heads, opts.head_dim)
    print("\n| lucid_values impl | fwd ms | fwd+bwd ms | peak MiB | rel. err X | dk | dv |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in result["lucid_op"]:
        print(f"| {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['peak_mib']:.0f} | "
              f"{r['rel_err_x']:.2e} | {r['rel_err_dk']:.2e} | {r['rel_err_dv']:.2e} |")
    print("\n| rows | cols | warps | split | solve dots | fwd ms | bwd ms | rel. err X | dk | dv |\n"
          "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in result["lucid_configs"]:
        head = (f"| {r['block_rows']} | {r['block_cols']} | {r['num_warps']} | {r['value_split']} | "
                f"{'tf32' if r['solve_tf32'] else 'ieee'} |")
        if "error" in r:
            print(f"{head} n/a: {r['error']} | | | | |")
        else:
            print(f"{head} {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {r['rel_err_x']:.2e} | "
                  f"{r['rel_err_dk']:.2e} | {r['rel_err_dv']:.2e} |")
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
