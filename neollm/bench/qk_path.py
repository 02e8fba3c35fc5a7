"""Micro-benchmark of the attention's q/k path (SeeDNorm -> RoPE -> momentum on q and on k): the
unfused reference (eager and torch.compile'd) against the fused Triton op
(neollm/kernels/qk_path.py), forward and forward + backward, at neollm_135m's shape (64 x 512
tokens, H 8 / Hkv 4, d 64, bf16), with peak memory above the inputs and each path's relative
difference from the eager reference. Run by tools/bench_qk_path.py; the numbers decide
``NEOLLM_QK_PATH_IMPL``'s default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from neollm.bench.launch_sweep import launches, module_settings
from neollm.bench.timing import forward_backward_costs, relative_diff
from neollm.kernels import qk_path as qp
from neollm.model.rope import rope_cache

EPS = 1e-6


def inputs(batch: int, seq_len: int, heads: int, d: int, dtype: torch.dtype, device: str = "cuda", seed: int = 0):
    """``([x, gamma, alpha, beta], dy)``: x [batch, seq_len, heads, d] and fp32 gamma, alpha, beta
    (leaves), gamma = alpha = 1 as at init, beta small but not 0 (at init tanh(<x, 0>) = 0 hides its
    term); dy the upstream gradient."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, seq_len, heads, d, device=device, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(batch, seq_len, heads, d, device=device, generator=gen).to(dtype)
    gamma = torch.ones(d, device=device, requires_grad=True)
    alpha = torch.ones(d, device=device, requires_grad=True)
    beta = (0.02 * torch.randn(d, device=device, generator=gen)).requires_grad_()
    return [x, gamma, alpha, beta], dy


def paths(rope: torch.Tensor, momentum_gamma: float, momentum_first: str) -> dict[str, Callable]:
    """name -> fn(x, gamma, alpha, beta) for each implementation."""
    def reference(x, g, a, b):
        return qp.qk_path_reference(x, g, a, b, rope, EPS, momentum_gamma, momentum_first)

    def fused(x, g, a, b):
        return qp.qk_path_op(x, g, a, b, rope, EPS, momentum_gamma, momentum_first, True)[0]

    return {"reference, eager": reference, "reference, torch.compile": torch.compile(reference), "triton": fused}


def rows_for(batch: int, seq_len: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype, momentum_gamma: float,
             momentum_first: str, steps: int = 20, block_ts: list[int] | None = None) -> list[dict]:
    """One result per path for one layer's q and k: forward ms, forward + backward ms, peak MiB above
    the inputs, and the relative difference of q's output and of dq from the eager reference.
    ``block_ts``: time the Triton path at each of these tokens per program (qk_path.BLOCK_T)."""
    rope = rope_cache(d, seq_len, 10_000.0, device="cuda")
    problems = (inputs(batch, seq_len, heads, d, dtype), inputs(batch, seq_len, kv_heads, d, dtype, seed=1))
    results, baseline = [], None
    sweep = [dict(BLOCK_T=bt) for bt in block_ts or []]
    for name, fn, settings in launches(paths(rope, momentum_gamma, momentum_first), sweep):
        def forward(fn=fn):
            with torch.no_grad():
                return [fn(*leaves) for leaves, _ in problems]

        def step(fn=fn):
            """q's output and its gradient to q, after both q's and k's forward and backward."""
            done = []
            for leaves, dy in problems:
                out = fn(*leaves)
                done.append((out, torch.autograd.grad(out, leaves, dy)[0]))
            return done[0]

        with module_settings(qp, **settings):
            out, dq = step()
            fwd_ms, step_ms, peak = forward_backward_costs(forward, step, steps)
            # as launched: at most T's power of two
            launch = dict(block_t=qp._grid(problems[0][0][0])[1]) if name.startswith("triton") else {}
        if baseline is None:
            baseline = (out, dq)
        results.append(dict(path=name, **launch, batch=batch, seq_len=seq_len, heads=heads, kv_heads=kv_heads, d=d,
                            dtype=str(dtype).removeprefix("torch."), momentum_gamma=momentum_gamma,
                            momentum_first=momentum_first, fwd_ms=fwd_ms, fwd_bwd_ms=step_ms, peak_mib=peak,
                            rel_diff_out=relative_diff(out, baseline[0]),
                            rel_diff_dx=relative_diff(dq, baseline[1])))
    return results


def table(results: list[dict]) -> str:
    lines = ["| path | momentum | fwd ms | fwd+bwd ms | peak MiB | rel diff q | rel diff dq |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['path']} | {r['momentum_gamma']} {r['momentum_first']} | {r['fwd_ms']:.3f} | "
                     f"{r['fwd_bwd_ms']:.3f} | {r['peak_mib']:.0f} | {r['rel_diff_out']:.2e} | "
                     f"{r['rel_diff_dx']:.2e} |")
    return "\n".join(lines)
