"""Micro-benchmark of the attention epilogue (XSA, directional routing, output gate): the unfused
reference (eager and torch.compile'd, under bf16 autocast as in the model) against the fused Triton op
(neollm/kernels/attention_epilogue.py), forward and forward + backward, at neollm_135m's shape
(64 * 512 tokens, 8 query heads over 4 KV heads, d 64, 4 routing directions, elementwise gate, bf16),
with peak memory above the inputs and each path's relative difference from the eager reference. Run
by tools/bench_epilogue.py; the numbers decide ``NEOLLM_EPILOGUE_IMPL``'s default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from neollm.bench.launch_sweep import launches, module_settings
from neollm.bench.timing import forward_backward_costs, relative_diff
from neollm.kernels import attention_epilogue as ep

EPS = 1e-6


def inputs(tokens: int, heads: int, kv_heads: int, head_dim: int, directions: int, dtype: torch.dtype,
           device: str = "cuda", seed: int = 0):
    """Leaves y, v, raw directions, router logits (fp32, as the bias add makes them), gate logits; and
    the upstream gradient. One sequence of ``tokens`` (the op sees tokens, not batch and time)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, device=device, generator=gen).to(dt).requires_grad_()

    leaves = (randn(1, tokens, heads, head_dim), randn(1, tokens, kv_heads, head_dim),
              randn(heads, directions, head_dim, dt=torch.float32), randn(1, tokens, heads, directions, dt=torch.float32),
              randn(1, tokens, heads, head_dim))
    d_out = torch.randn(1, tokens, heads, head_dim, device=device, generator=gen).to(dtype)
    return leaves, d_out


def paths() -> dict[str, Callable]:
    """name -> fn(y, v, directions, route_logits, gate_logits) for each implementation."""
    def reference(y, v, dirs, z, g):
        return ep.attention_epilogue(y, v, dirs, z, g, EPS, impl="torch")

    def fused(y, v, dirs, z, g):
        return ep.attention_epilogue(y, v, dirs, z, g, EPS, impl="triton")

    return {"reference, eager": reference, "reference, torch.compile": torch.compile(reference), "triton": fused}


def rows_for(tokens: int, heads: int, kv_heads: int, head_dim: int, directions: int, dtype: torch.dtype,
             steps: int = 20, block_ns: list[int] | None = None, warps: list[int] | None = None) -> list[dict]:
    """One result per path: forward ms, forward + backward ms, peak MiB above the inputs, and the
    relative difference of the output and of dy from the eager reference. ``block_ns`` / ``warps``: time
    the Triton path at each (tokens per program, warps) pair (attention_epilogue.BLOCK_N, NUM_WARPS)."""
    leaves, d_out = inputs(tokens, heads, kv_heads, head_dim, directions, dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    results, baseline = [], None
    sweep = ([dict(BLOCK_N=n, NUM_WARPS=w) for n in block_ns or [ep.BLOCK_N] for w in warps or [ep.NUM_WARPS]]
             if block_ns or warps else [])
    for name, fn, settings in launches(paths(), sweep):
        def forward(fn=fn):
            with torch.no_grad(), autocast:
                return fn(*leaves)

        def step(fn=fn):
            with autocast:
                out = fn(*leaves)
            return out, torch.autograd.grad(out, leaves, d_out)

        with module_settings(ep, **settings):
            out, grads = step()
            fwd_ms, step_ms, peak = forward_backward_costs(forward, step, steps)
            launch = dict(block_n=ep.BLOCK_N, num_warps=ep.NUM_WARPS) if name.startswith("triton") else {}
        if baseline is None:
            baseline = (out, grads[0])
        results.append(dict(path=name, **launch, tokens=tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                            directions=directions, dtype=str(dtype).removeprefix("torch."),
                            fwd_ms=fwd_ms, fwd_bwd_ms=step_ms, peak_mib=peak,
                            rel_diff_out=relative_diff(out, baseline[0]),
                            rel_diff_dy=relative_diff(grads[0], baseline[1])))
    return results


def table(results: list[dict]) -> str:
    lines = ["| path | fwd ms | fwd+bwd ms | peak MiB | rel diff out | rel diff dy |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['path']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['peak_mib']:.0f} | "
                     f"{r['rel_diff_out']:.2e} | {r['rel_diff_dy']:.2e} |")
    return "\n".join(lines)
