"""Attention-kernel measurements behind tools/bench_attention.py (its docstring says what each part
measures): SDPA backends, LUCID's preconditioner precision, LUCID's op and kernel launch configurations,
and the launch configurations of LUCID's key-gradient kernel alone.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from neollm.bench.timing import relative_diff, time_ms
from neollm.errors import ConfigError
from neollm.kernels import lucid as lucid_kernels
from neollm.model import attention_ops as ops


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
                         **{f"rel_err_{n}": relative_diff(a, b) for n, a, b in zip(("x", "dk", "dv"), got, want)}))
    return rows


# (rows per block, column chunk, warps, programs per head in the substitutions)
LUCID_CONFIGS = [(64, 64, 4, 1), (64, 64, 8, 1), (64, 64, 4, 2), (64, 64, 4, 4), (32, 64, 4, 1), (32, 64, 4, 2),
                 (32, 32, 4, 4), (16, 64, 4, 1), (16, 64, 2, 4), (16, 32, 2, 2), (128, 64, 8, 2)]


# (products, diagonal step, solve): each precision (lucid.DOT_PRECISIONS) with the substitution diagonal
# step, the inverted diagonal blocks (lucid.DIAGONALS, the default) in tf32x3 and IEEE products, and the
# look-back solve (lucid.SOLVES) in tf32x3
LUCID_VARIANTS = ([(dots, "substitute", "walk") for dots in lucid_kernels.DOT_PRECISIONS]
                  + [("tf32x3", "inverse", "walk"), ("ieee", "inverse", "walk"), ("tf32x3", "inverse", "lookback")])


def _lucid_kernel_inputs(batch: int, seq: int, kv_heads: int, head_dim: int):
    """fp32 normalised correlated keys, bf16 values, an fp32 upstream gradient, and the fp64 reference's
    X, dK and dV: the kernel sweeps' common problem."""
    g = torch.Generator(device="cuda").manual_seed(3)
    k = torch.randn(batch, kv_heads, 1, head_dim, device="cuda", generator=g) + 0.2 * torch.randn(
        batch, kv_heads, seq, head_dim, device="cuda", generator=g)
    kr = ops.rms_normalize(k, 1e-6)
    v = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", generator=g).to(torch.bfloat16)
    dx = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", generator=g)
    x64 = lucid_kernels.solve_reference(kr.double(), v.double())
    dk64, dv64 = lucid_kernels.solve_backward_reference(kr.double(), x64, dx.double())
    return kr, v, dx, x64, dk64, dv64


def lucid_config_rows(batch: int, seq: int, kv_heads: int, head_dim: int,
                      configs: list[tuple[int, int, int, int]] | None = None,
                      variants: list[tuple[str, str, str]] | None = None) -> list[dict]:
    """The kernels alone on fp32 normalised keys at each launch configuration (default LUCID_CONFIGS)
    and each (products, diagonal, solve) variant (default LUCID_VARIANTS); the backward's key gradient
    at its own launch (lucid.KEY_GRAD_*, swept by lucid_key_grad_rows). Every pair compiles its own
    kernels (~3 s each on an H100): the whole default grid takes minutes, a chosen pair seconds."""
    kr, v, dx, x64, dk64, dv64 = _lucid_kernel_inputs(batch, seq, kv_heads, head_dim)
    rows, timed = [], set()
    for rows_, cols, warps, split in LUCID_CONFIGS if configs is None else configs:
        for dots, diagonal, solve in LUCID_VARIANTS if variants is None else variants:
            if solve == "lookback":  # one program per row block with all of d: no column chunk, no split
                if (rows_, warps, dots) in timed:
                    continue
                timed.add((rows_, warps, dots))
            launch = dict(block_rows=rows_, block_cols=cols, num_warps=warps, value_split=split, dots=dots,
                          diagonal=diagonal, solve=solve)
            try:
                # as the op runs them: the backward reuses the forward's diagonal inverses
                x, dinv = lucid_kernels.solve_kernel_keeping_inverses(kr, v, **launch)
                kept = dinv if dinv.numel() else None
                dk, dv = lucid_kernels.solve_backward_kernel(kr, x, dx, dinv=kept, **launch)
                rows.append(dict(
                    **launch,
                    fwd_ms=time_ms(lambda: lucid_kernels.solve_kernel_keeping_inverses(kr, v, **launch)),
                    bwd_ms=time_ms(lambda: lucid_kernels.solve_backward_kernel(kr, x, dx, dinv=kept, **launch)),
                    rel_err_x=relative_diff(x, x64), rel_err_dk=relative_diff(dk, dk64),
                    rel_err_dv=relative_diff(dv, dv64)))
            except Exception as err:  # noqa: BLE001 - a configuration that does not compile is a result
                rows.append(dict(**launch, error=str(err).splitlines()[0][:120]))
    return rows


# (rows per block, column chunk, warps, software-pipelining stages) of the key gradient alone; the first is
# its launch before it had its own (the substitutions' tiles and warps, Triton's default 3 stages on CUDA)
LUCID_KEY_GRAD_CONFIGS = [(32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3),
                          (64, 64, 4, 2), (64, 128, 8, 3), (32, 128, 4, 3), (128, 32, 8, 2)]


def lucid_key_grad_rows(batch: int, seq: int, kv_heads: int, head_dim: int,
                        configs: list[tuple[int, int, int, int]] | None = None) -> list[dict]:
    """``lucid.key_grad`` alone at each (rows, cols, warps, stages) (default LUCID_KEY_GRAD_CONFIGS), on
    lucid_config_rows' problem with X and dV solved once by the default kernels: its programs are
    independent, so its tiles are timed apart from the substitutions' walk. Error of dK against fp64."""
    kr, v, dx, _, dk64, _ = _lucid_kernel_inputs(batch, seq, kv_heads, head_dim)
    x = lucid_kernels.solve_kernel(kr, v)
    dv = lucid_kernels.substitute(kr, dx, transposed=True)
    rows = []
    for rows_, cols, warps, stages in LUCID_KEY_GRAD_CONFIGS if configs is None else configs:
        launch = dict(block_rows=rows_, block_cols=cols, num_warps=warps, num_stages=stages)
        try:
            dk = lucid_kernels.key_grad(kr, x, dv, **launch)
            rows.append(dict(**launch, ms=time_ms(lambda: lucid_kernels.key_grad(kr, x, dv, **launch)),
                             rel_err_dk=relative_diff(dk, dk64)))
        except Exception as err:  # noqa: BLE001 - a configuration that does not compile is a result
            rows.append(dict(**launch, error=str(err).splitlines()[0][:120]))
    return rows


def sdpa_and_lucid(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """Parts 1 and 2: the SDPA backends' rows and LUCID's Gram precision rows."""
    return dict(sdpa=sdpa_rows(batch, seq, heads, kv_heads, head_dim),
                lucid=lucid_rows(batch, seq, kv_heads, head_dim))


def lucid_op(batch: int, seq: int, kv_heads: int, head_dim: int,
             configs: list[tuple[int, int, int, int]] | None = None,
             variants: list[tuple[str, str, str]] | None = None) -> dict:
    """Part 3: LUCID's op (Triton and PyTorch) and the kernels' launch configurations."""
    return dict(lucid_op=lucid_op_rows(batch, seq, kv_heads, head_dim),
                lucid_configs=lucid_config_rows(batch, seq, kv_heads, head_dim, configs, variants))


def lucid_key_grad(batch: int, seq: int, kv_heads: int, head_dim: int,
                   configs: list[tuple[int, int, int, int]] | None = None) -> dict:
    """Part 4: the launch configurations of LUCID's key-gradient kernel alone."""
    return dict(lucid_key_grad=lucid_key_grad_rows(batch, seq, kv_heads, head_dim, configs))


def _parse_launches(text: str, what: str, fields: str, example: str) -> list[tuple[int, ...]]:
    """``"a,b,c,d;..."`` -> [(a, b, c, d), ...] of positive integers; a ValueError naming ``fields`` else."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        values = item.split(",")
        if len(values) != 4 or not all(f.strip().isdigit() and int(f) > 0 for f in values):
            raise ValueError(f"{what} {item!r}: want four positive integers {fields} (e.g. {example})")
        out.append(tuple(int(f) for f in values))
    if not out:
        raise ValueError(f"no {what} in {text!r}: want {fields}[;...]")
    return out


def parse_lucid_configs(text: str) -> list[tuple[int, int, int, int]]:
    """``"32,64,4,1;64,64,4,1"`` -> [(rows, column chunk, warps, programs per head), ...]."""
    return _parse_launches(text, "LUCID launch configuration", "ROWS,COLS,WARPS,SPLIT", "32,64,4,1")


def parse_lucid_key_grad_configs(text: str) -> list[tuple[int, int, int, int]]:
    """``"32,64,4,3;64,64,8,3"`` -> [(rows, column chunk, warps, stages), ...] of the key gradient."""
    return _parse_launches(text, "LUCID key-gradient launch", "ROWS,COLS,WARPS,STAGES", "32,64,4,3")


def parse_lucid_variants(text: str) -> list[tuple[str, str, str]]:
    """``"tf32x3:substitute,tf32x3:inverse:lookback"`` -> [(products, diagonal, solve), ...], each
    checked; the solve defaults to "walk"."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split(":")
        dots, diagonal, solve = (fields + ["walk"] if len(fields) == 2 else fields + ["", "", ""])[:3]
        want = (f"want PRODUCTS:DIAGONAL[:SOLVE] with products one of {lucid_kernels.DOT_PRECISIONS}, diagonal "
                f"one of {lucid_kernels.DIAGONALS} and solve one of {lucid_kernels.SOLVES}")
        if (len(fields) not in (2, 3) or dots not in lucid_kernels.DOT_PRECISIONS
                or diagonal not in lucid_kernels.DIAGONALS):
            raise ValueError(f"LUCID variant {item!r}: {want}")
        try:
            lucid_kernels.check_solve(solve, diagonal == "inverse")
        except ConfigError as error:
            raise ValueError(f"LUCID variant {item!r}: {want}; {error}") from None
        out.append((dots, diagonal, solve))
    if not out:
        raise ValueError(f"no LUCID variant in {text!r}: want PRODUCTS:DIAGONAL[:SOLVE][,...]")
    return out


def markdown(result: dict) -> str:
    """The markdown tables of the parts in ``result`` (each part's table as the tool prints it)."""
    parts = (("sdpa", _sdpa_markdown), ("lucid_op", _lucid_op_markdown), ("lucid_key_grad", _key_grad_markdown))
    return "\n".join(line for key, table in parts if key in result for line in table(result))


def _sdpa_markdown(result: dict) -> list[str]:
    lines = ["| SDPA fwd+bwd | ms | max diff vs flash |\n|---|---:|---:|"]
    for r in result["sdpa"]:
        ms = "n/a: " + r["error"] if r.get("ms") is None else f"{r['ms']:.3f}"
        lines.append(f"| {r['case']} | {ms} | {r.get('max_diff_vs_flash', float('nan')):.2e} |")
    lines.append("\n| LUCID keys | Gram | rel. error of X vs fp64 | max off-diagonal P | fwd+bwd ms |"
                 "\n|---|---|---:|---:|---:|")
    for r in result["lucid"]:
        ms = f"{r['fwd_bwd_ms']:.2f}" if "fwd_bwd_ms" in r else ""
        lines.append(f"| {r['keys']} | {r['gram']} | {r['rel_err_x']:.2e} | {r['p_offdiag_max']:.3f} | {ms} |")
    return lines


def _lucid_op_markdown(result: dict) -> list[str]:
    lines = ["\n| lucid_values impl | fwd ms | fwd+bwd ms | peak MiB | rel. err X | dk | dv |"
             "\n|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["lucid_op"]:
        lines.append(f"| {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['peak_mib']:.0f} | "
                     f"{r['rel_err_x']:.2e} | {r['rel_err_dk']:.2e} | {r['rel_err_dv']:.2e} |")
    lines.append("\n| rows | cols | warps | split | dots | diagonal | solve | fwd ms | bwd ms | rel. err X | dk | dv |\n"
                 "|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|")
    for r in result["lucid_configs"]:
        head = (f"| {r['block_rows']} | {r['block_cols']} | {r['num_warps']} | {r['value_split']} | "
                f"{r['dots']} | {r['diagonal']} | {r['solve']} |")
        if "error" in r:
            lines.append(f"{head} n/a: {r['error']} | | | | |")
        else:
            lines.append(f"{head} {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {r['rel_err_x']:.2e} | "
                         f"{r['rel_err_dk']:.2e} | {r['rel_err_dv']:.2e} |")
    return lines


def _key_grad_markdown(result: dict) -> list[str]:
    lines = ["\n| rows | cols | warps | stages | key grad ms | rel. err dk |\n|---:|---:|---:|---:|---:|---:|"]
    for r in result["lucid_key_grad"]:
        head = f"| {r['block_rows']} | {r['block_cols']} | {r['num_warps']} | {r['num_stages']} |"
        tail = f"n/a: {r['error']} | |" if "error" in r else f"{r['ms']:.3f} | {r['rel_err_dk']:.2e} |"
        lines.append(f"{head} {tail}")
    return lines
