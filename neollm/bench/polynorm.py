"""Micro-benchmark of the PolyNorm GLU product ``PolyNorm(g) * u``: the unfused reference (eager and
torch.compile'd) against the fused Triton op (neollm/kernels/polynorm_glu.py), forward and
forward + backward, at neollm_135m's shape (64 * 512 rows of F 1536, bf16), with peak memory above
the inputs and each path's relative difference from the eager reference. Run by
tools/bench_polynorm.py; the numbers decide ``NEOLLM_POLYNORM_IMPL``'s default. With ``simplenorm``
g and u are raw projection outputs with SimpleNorm gains (neollm_135m's MLP), and the paths include the
op with the norms compiled apart and folded in (``NEOLLM_POLYNORM_FOLD_SIMPLENORM``'s question).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from neollm.bench.timing import forward_backward_costs, relative_diff
from neollm.kernels import polynorm_glu as pg

EPS = PROJ_EPS = 1e-6
IN_EPS = 1e-5  # neollm_135m's norm_eps, SimpleNorm's eps


def inputs(rows: int, n: int, dtype: torch.dtype, exclusive: bool, device: str = "cuda", seed: int = 0):
    """g, u (leaves), the upstream gradient, and fp32 weight, bias, logits (leaves) at their init
    (weight 1/3, bias 0, logits logit(1e-4))."""
    gen = torch.Generator(device=device).manual_seed(seed)
    g = torch.randn(rows, n, device=device, generator=gen).to(dtype).requires_grad_()
    u = torch.randn(rows, n, device=device, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(rows, n, device=device, generator=gen).to(dtype)
    weight = torch.full((3,), 1.0 / 3.0, device=device, requires_grad=True)
    bias = torch.zeros(1, device=device, requires_grad=True)
    logits = torch.full((2,), math.log(1e-4 / (1 - 1e-4)), device=device, requires_grad=True) if exclusive else None
    return g, u, dy, weight, bias, logits


def gains(n: int, dtype: torch.dtype, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """SimpleNorm gains of the gate and up projections (leaves, at their init of 1)."""
    return tuple(torch.ones(n, device=device, dtype=dtype, requires_grad=True) for _ in range(2))


def paths(simplenorm: bool = False) -> dict[str, Callable]:
    """name -> fn(g, u, weight, bias, logits, g_gain, u_gain) for each implementation (gains None
    without ``simplenorm``)."""
    def reference(g, u, w, b, lg, gg, gu):
        return pg.polynorm_glu_reference(g, u, w, b, lg, EPS, PROJ_EPS, gg, gu, IN_EPS)

    def fused(g, u, w, b, lg, gg, gu):
        return pg.polynorm_glu_op(g, u, w, b, lg, EPS, PROJ_EPS, True)[0]

    out = {"reference, eager": reference, "reference, torch.compile": torch.compile(reference), "triton": fused}
    if simplenorm:
        def norms(g, u, gg, gu):
            return F.rms_norm(g, (g.shape[-1],), gg, IN_EPS), F.rms_norm(u, (u.shape[-1],), gu, IN_EPS)

        compiled_norms = torch.compile(norms)

        def apart(g, u, w, b, lg, gg, gu):
            return pg.polynorm_glu_op(*compiled_norms(g, u, gg, gu), w, b, lg, EPS, PROJ_EPS, True)[0]

        def folded(g, u, w, b, lg, gg, gu):
            return pg.polynorm_glu_op(g, u, w, b, lg, EPS, PROJ_EPS, True, gg, gu, IN_EPS)[0]

        del out["triton"]
        out.update({"triton, SimpleNorm compiled apart": apart, "triton, SimpleNorm folded": folded})
    return out


def rows_for(rows: int, n: int, dtype: torch.dtype, exclusive: bool, steps: int = 20,
             simplenorm: bool = False) -> list[dict]:
    """One result per path: forward ms, forward + backward ms, peak MiB above the inputs, and the
    relative difference of the output and of dg from the eager reference."""
    g, u, dy, w, b, lg = inputs(rows, n, dtype, exclusive)
    gg, gu = gains(n, dtype) if simplenorm else (None, None)
    params = [t for t in (g, u, w, b, lg, gg, gu) if t is not None]
    results, baseline = [], None
    for name, fn in paths(simplenorm).items():
        def forward(fn=fn):
            with torch.no_grad():
                return fn(g, u, w, b, lg, gg, gu)

        def step(fn=fn):
            out = fn(g, u, w, b, lg, gg, gu)
            return out, torch.autograd.grad(out, params, dy)

        out, grads = step()
        if baseline is None:
            baseline = (out, grads[0])
        fwd_ms, step_ms, peak = forward_backward_costs(forward, step, steps)
        results.append(dict(path=name, rows=rows, F=n, dtype=str(dtype).removeprefix("torch."), exclusive=exclusive,
                            simplenorm=simplenorm,
                            fwd_ms=fwd_ms, fwd_bwd_ms=step_ms, peak_mib=peak,
                            rel_diff_out=relative_diff(out, baseline[0]),
                            rel_diff_dg=relative_diff(grads[0], baseline[1])))
    return results


def table(results: list[dict]) -> str:
    lines = ["| path | F | exclusive | fwd ms | fwd+bwd ms | peak MiB | rel diff out | rel diff dg |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['path']} | {r['F']} | {r['exclusive']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{r['peak_mib']:.0f} | {r['rel_diff_out']:.2e} | {r['rel_diff_dg']:.2e} |")
    return "\n".join(lines)
