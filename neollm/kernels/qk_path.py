"""The attention's q/k path, SeeDNorm -> RoPE -> momentum, as one custom op: a Triton kernel forward
and one backward, and the plain PyTorch reference they must match.

Per head vector x [d] of q [B, T, H, d] (or k [B, T, Hkv, d]) at token t, in fp32
(neollm/model/attention.py, steps 3-5, as the flavor ``neollm_135m`` runs them):
``r = rsqrt(mean(x^2) + eps)``, ``s = tanh(<x, beta>)``, ``c = s alpha + gamma``,
``n = c * x r`` (SeeDNorm; gamma, alpha, beta [d] shared by the heads), ``p_t = Rot(t) n_t``
(RoPE, rotate-half: ``p1 = n1 cos - n2 sin``, ``p2 = n2 cos + n1 sin`` over the halves of d),
``out_t = p_t + mg (p_t - p_{t-1})`` along T with ``p_{-1} = 0`` ("zero") or ``p_0`` ("repeat");
``mg = 0`` is no momentum.

Why a kernel: the eager path is ~20 ops over q and k (upcasts, two row reductions, RoPE's slices
and cat, momentum's shifted cat), each a pass over HBM unless torch.compile fuses it, with casts to
the activation dtype between the three steps, and autograd keeps several q-sized tensors. Here one
program takes a block of ``BLOCK_T`` tokens of one (batch, head): forward reads x once (and the
previous token's rows, whose SeeDNorm and RoPE it recomputes rather than making a second pass) and
writes ``out`` in x's dtype plus 2 fp32 numbers per row (r and s); backward reads x, the upstream
gradient (rows t and t + 1) and those numbers once and writes dx and per-program partial sums of
dgamma, dalpha, dbeta ([programs, 3, d] fp32, summed in torch). All math is fp32 and the result
is rounded once, where the reference rounds after each step: with bf16 q the kernels' gradient of
gamma, alpha, beta was 3e-7 to 5e-7 off fp64 against the reference's 2e-3 to 4e-3
(tests/qk_path_interpreted.py with QK_PATH_CHECK_VERBOSE=1, on the CPU).

Backward, for the upstream gradient ``g_t = dL/dout_t``:
* momentum's transpose: ``dp_t = (1 + mg) g_t - mg g_{t+1}`` (no ``g_T``); with "repeat",
  ``out_0 = p_0``, so ``dp_0 = g_0 - mg g_1``;
* RoPE's transpose, the rotation by ``-angle``: ``dn1 = dp1 cos + dp2 sin``,
  ``dn2 = dp2 cos - dp1 sin``;
* SeeDNorm, with ``xh = x r`` and ``u = dn * xh``: ``dgamma += u``, ``dalpha += s u``,
  ``dz = <u, alpha> (1 - s^2)`` (through the tanh), ``dbeta += dz x``, and
  ``dx = r (dxh - xh mean(dxh * xh)) + dz beta`` with ``dxh = dn * c`` (the RMS backward).
``backward_reference`` is the same in PyTorch, checked against autograd in fp64
(tests/test_qk_path.py).

Switch: ``QK_PATH_IMPL`` (environment ``NEOLLM_QK_PATH_IMPL``) = "auto" (default: the kernels
where they can run, on CUDA), "torch" (the attention runs ``attention_ops.seednorm``,
``rope.apply_rope`` and ``attention_ops.momentum_shift``) or "triton" (the kernels; CUDA,
fp32/bf16/fp16; an error elsewhere). The attention takes the op only with ``seednorm_qk`` on (q and k then
get SeeDNorm, never the plain QK RMSNorm) and only in ``forward``: decoding (``Attention.step``)
keeps the unfused path. The default is "auto": neollm_135m's real trainer on an H100 ran 1.18x faster with the four
technique kernels (LUCID, PolyNorm GLU, q/k path, epilogue) than with the references, and 1.04x with
the three besides LUCID (BENCHMARKS.md, 2026-12-05).
Alone (tools/bench_qk_path.py, H100) the op's forward + backward took 2.04 ms against the compiled
reference's 1.38: its share of the trainer's gain is not measured apart.
"""

from __future__ import annotations

import os

import torch

from neollm.kernels.triton_support import KERNEL_IMPLS, resolve_impl, unavailable_reason
from neollm.model import attention_ops
from neollm.model.rope import apply_rope
from neollm.precision import compute_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA torch builds
    triton = None

N_STATS = 2  # per row (token, head): r = rsqrt(mean(x^2) + eps), s = tanh(<x, beta>)
N_PARAM_GRADS = 3  # dgamma, dalpha, dbeta, each [d]
BLOCK_T = 32  # tokens per program (a [BLOCK_T, d / 2] tile per half of d); not yet timed


# ---- the reference ----------------------------------------------------------------------------
def qk_path_reference(x: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                      rope: torch.Tensor, eps: float, momentum_gamma: float, momentum_first: str) -> torch.Tensor:
    """SeeDNorm, RoPE, momentum of ``x [B, T, heads, d]`` by the model's own functions in the model's
    order (the unfused path, bit for bit), each casting back to x's dtype."""
    out = apply_rope(attention_ops.seednorm(x, gamma, alpha, beta, eps), rope)
    if momentum_gamma != 0.0:
        out = attention_ops.momentum_shift(out, momentum_gamma, momentum_first)
    return out


def _row_stats(x: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """``[rows, N_STATS]``: r and s of each row of x, in the compute dtype."""
    dt = compute_dtype(x)
    xf = x.reshape(-1, x.shape[-1]).to(dt)
    return torch.stack([torch.rsqrt(xf.pow(2).mean(-1) + eps), torch.tanh(xf @ beta.to(dt))], dim=-1)


def forward_reference(x: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                      rope: torch.Tensor, eps: float, momentum_gamma: float,
                      momentum_first: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)`` as the forward kernel returns them: the reference's output and the row
    statistics ``[rows, N_STATS]`` in the compute dtype (what ``backward_reference`` reads)."""
    out = qk_path_reference(x, gamma, alpha, beta, rope, eps, momentum_gamma, momentum_first)
    return out, _row_stats(x, beta, eps)


def _momentum_transpose(g: torch.Tensor, momentum_gamma: float, momentum_first: str) -> torch.Tensor:
    """dp from the gradient g of ``out_t = p_t + mg (p_t - p_{t-1})`` along dim 1."""
    if momentum_gamma == 0.0:
        return g
    following = torch.cat([g[:, 1:], torch.zeros_like(g[:, :1])], dim=1)
    dp = (1.0 + momentum_gamma) * g - momentum_gamma * following
    if momentum_first == "repeat":  # out_0 = p_0: the first row's own coefficient is 1
        dp = torch.cat([dp[:, :1] - momentum_gamma * g[:, :1], dp[:, 1:]], dim=1)
    return dp


def _inverse_rope(rope: torch.Tensor) -> torch.Tensor:
    """The table of the rotation by -angle (cos | -sin): RoPE's transpose through ``apply_rope``."""
    half = rope.shape[-1] // 2
    return torch.cat([rope[:, :half], -rope[:, half:]], dim=-1)


def backward_reference(x: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                       rope: torch.Tensor, stats: torch.Tensor, dout: torch.Tensor, momentum_gamma: float,
                       momentum_first: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dparams)`` of the q/k path for the upstream gradient ``dout``: the backward the kernel
    implements (module docstring) in the compute dtype from start to end (the fused path, which
    rounds once; the unfused one rounds after each step). ``dparams [N_PARAM_GRADS, d]``: dgamma,
    dalpha, dbeta in the compute dtype."""
    d = x.shape[-1]
    dt = compute_dtype(x)
    dp = _momentum_transpose(dout.to(dt), momentum_gamma, momentum_first)
    dn = apply_rope(dp, _inverse_rope(rope)).reshape(-1, d)
    xf = x.reshape(-1, d).to(dt)
    st = stats.to(dt)
    r, s = st[:, 0:1], st[:, 1:2]
    g, a, b = gamma.to(dt), alpha.to(dt), beta.to(dt)
    xh = xf * r
    u = dn * xh
    dz = (u @ a).unsqueeze(-1) * (1.0 - s * s)
    dxh = dn * (s * a + g)
    dx = r * (dxh - xh * (dxh * xh).mean(-1, keepdim=True)) + dz * b
    dparams = torch.stack([u.sum(0), (s * u).sum(0), (dz * xf).sum(0)])
    return dx.reshape(x.shape).to(x.dtype), dparams


# ---- the kernels ------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _tanh(z):
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(z < 0, -t, t)

    @triton.jit
    def _seed_rope(x_ptr, rope_ptr, rows, t, ok, cols, half, eps, g1, g2, a1, a2, b1, b2):
        """SeeDNorm then RoPE of the rows ``rows`` (tokens t) of x: the two halves of p, r and s."""
        lo = x_ptr + rows[:, None] * (2 * half) + cols[None, :]
        x1 = tl.load(lo, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(lo + half, mask=ok, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + eps)
        s = _tanh(tl.sum(x1 * b1[None, :], axis=1) + tl.sum(x2 * b2[None, :], axis=1))
        n1 = (s[:, None] * a1[None, :] + g1[None, :]) * (x1 * r[:, None])
        n2 = (s[:, None] * a2[None, :] + g2[None, :]) * (x2 * r[:, None])
        table = rope_ptr + t[:, None] * (2 * half) + cols[None, :]
        cos = tl.load(table, mask=ok, other=0.0).to(tl.float32)
        sin = tl.load(table + half, mask=ok, other=0.0).to(tl.float32)
        return n1 * cos - n2 * sin, n2 * cos + n1 * sin, r, s

    @triton.jit
    def _param_halves(ptr, cols, ok_c, half):
        return (tl.load(ptr + cols, mask=ok_c, other=0.0).to(tl.float32),
                tl.load(ptr + half + cols, mask=ok_c, other=0.0).to(tl.float32))

    @triton.jit
    def _tile(T, H, half, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        """This program's tokens t, their rows of the [B * T * H, d] view, the columns of one half,
        and the masks (valid columns; valid tokens and columns)."""
        bh = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        rows = ((bh // H) * T + t) * H + bh % H
        cols = tl.arange(0, BLOCK_H)
        ok_c = cols < half
        return t, rows, cols, ok_c, (t < T)[:, None] & ok_c[None, :]

    @triton.jit
    def _qk_path_forward_kernel(x_ptr, rope_ptr, g_ptr, a_ptr, b_ptr, out_ptr, stats_ptr, T, H, half, eps, mg,
                                MOMENTUM: tl.constexpr, REPEAT_FIRST: tl.constexpr, BLOCK_T: tl.constexpr,
                                BLOCK_H: tl.constexpr):
        """BLOCK_T tokens of one (batch, head): SeeDNorm, RoPE, momentum (previous rows recomputed)."""
        t, rows, cols, ok_c, ok = _tile(T, H, half, BLOCK_T, BLOCK_H)
        g1, g2 = _param_halves(g_ptr, cols, ok_c, half)
        a1, a2 = _param_halves(a_ptr, cols, ok_c, half)
        b1, b2 = _param_halves(b_ptr, cols, ok_c, half)
        p1, p2, r, s = _seed_rope(x_ptr, rope_ptr, rows, t, ok, cols, half, eps, g1, g2, a1, a2, b1, b2)
        if MOMENTUM:  # the previous token is H rows back; before t = 0 the masked loads give p = 0
            q1, q2, _, _ = _seed_rope(x_ptr, rope_ptr, rows - H, t - 1, ok & (t >= 1)[:, None], cols, half, eps,
                                      g1, g2, a1, a2, b1, b2)
            if REPEAT_FIRST:
                first = (t == 0)[:, None]
                q1 = tl.where(first, p1, q1)
                q2 = tl.where(first, p2, q2)
            p1 = p1 + mg * (p1 - q1)
            p2 = p2 + mg * (p2 - q2)
        lo = out_ptr + rows[:, None] * (2 * half) + cols[None, :]
        tl.store(lo, p1.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(lo + half, p2.to(out_ptr.dtype.element_ty), mask=ok)
        ok_t = t < T
        tl.store(stats_ptr + rows * 2, r, mask=ok_t)
        tl.store(stats_ptr + rows * 2 + 1, s, mask=ok_t)

    @triton.jit
    def _qk_path_backward_kernel(x_ptr, rope_ptr, g_ptr, a_ptr, b_ptr, stats_ptr, dout_ptr, dx_ptr, part_ptr, T, H, half,
                                 mg, MOMENTUM: tl.constexpr, REPEAT_FIRST: tl.constexpr, BLOCK_T: tl.constexpr,
                                 BLOCK_H: tl.constexpr):
        """BLOCK_T tokens of one (batch, head): dx, and the tile's sums of dgamma, dalpha, dbeta."""
        t, rows, cols, ok_c, ok = _tile(T, H, half, BLOCK_T, BLOCK_H)
        offs = rows[:, None] * (2 * half) + cols[None, :]
        dp1 = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dp2 = tl.load(dout_ptr + offs + half, mask=ok, other=0.0).to(tl.float32)
        if MOMENTUM:  # the next token is H rows on; none after T - 1
            ok_next = ok & (t + 1 < T)[:, None]
            e1 = tl.load(dout_ptr + offs + H * 2 * half, mask=ok_next, other=0.0).to(tl.float32)
            e2 = tl.load(dout_ptr + offs + H * 2 * half + half, mask=ok_next, other=0.0).to(tl.float32)
            f1 = (1.0 + mg) * dp1 - mg * e1
            f2 = (1.0 + mg) * dp2 - mg * e2
            if REPEAT_FIRST:  # out_0 = p_0: the first row's own coefficient is 1
                first = (t == 0)[:, None]
                f1 = tl.where(first, f1 - mg * dp1, f1)
                f2 = tl.where(first, f2 - mg * dp2, f2)
            dp1 = f1
            dp2 = f2
        table = rope_ptr + t[:, None] * (2 * half) + cols[None, :]
        cos = tl.load(table, mask=ok, other=0.0).to(tl.float32)
        sin = tl.load(table + half, mask=ok, other=0.0).to(tl.float32)
        dn1 = dp1 * cos + dp2 * sin
        dn2 = dp2 * cos - dp1 * sin
        x1 = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + offs + half, mask=ok, other=0.0).to(tl.float32)
        ok_t = t < T
        r = tl.load(stats_ptr + rows * 2, mask=ok_t, other=0.0)[:, None]
        s = tl.load(stats_ptr + rows * 2 + 1, mask=ok_t, other=0.0)[:, None]
        g1, g2 = _param_halves(g_ptr, cols, ok_c, half)
        a1, a2 = _param_halves(a_ptr, cols, ok_c, half)
        b1, b2 = _param_halves(b_ptr, cols, ok_c, half)
        xh1 = x1 * r
        xh2 = x2 * r
        u1 = dn1 * xh1
        u2 = dn2 * xh2
        dz = (tl.sum(u1 * a1[None, :], axis=1) + tl.sum(u2 * a2[None, :], axis=1))[:, None] * (1.0 - s * s)
        dxh1 = dn1 * (s * a1[None, :] + g1[None, :])
        dxh2 = dn2 * (s * a2[None, :] + g2[None, :])
        proj = (tl.sum(dxh1 * xh1, axis=1) + tl.sum(dxh2 * xh2, axis=1))[:, None] / (2 * half)
        dx1 = r * (dxh1 - xh1 * proj) + dz * b1[None, :]
        dx2 = r * (dxh2 - xh2 * proj) + dz * b2[None, :]
        tl.store(dx_ptr + offs, dx1.to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(dx_ptr + offs + half, dx2.to(dx_ptr.dtype.element_ty), mask=ok)
        pid = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)).to(tl.int64)
        base = part_ptr + pid * 3 * (2 * half) + cols
        tl.store(base, tl.sum(u1, axis=0), mask=ok_c)
        tl.store(base + half, tl.sum(u2, axis=0), mask=ok_c)
        tl.store(base + 2 * half, tl.sum(s * u1, axis=0), mask=ok_c)
        tl.store(base + 3 * half, tl.sum(s * u2, axis=0), mask=ok_c)
        tl.store(base + 4 * half, tl.sum(dz * x1, axis=0), mask=ok_c)
        tl.store(base + 5 * half, tl.sum(dz * x2, axis=0), mask=ok_c)


def kernel_unavailable_reason(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """Why the Triton kernels cannot serve tensors on ``device`` of these dtypes (None when they can)."""
    return unavailable_reason(device, dtypes)


def _grid(x: torch.Tensor) -> tuple[tuple[int, int], int, int]:
    """((batch * heads, token blocks), BLOCK_T, BLOCK_H): a program per block of tokens of one head."""
    batch, seq_len, heads, d = x.shape
    block_t = min(BLOCK_T, triton.next_power_of_2(seq_len))
    return (batch * heads, triton.cdiv(seq_len, block_t)), block_t, triton.next_power_of_2(d // 2)


def _flags(momentum_gamma: float, momentum_first: str) -> dict[str, bool]:
    return dict(MOMENTUM=momentum_gamma != 0.0, REPEAT_FIRST=momentum_first == "repeat")


def forward_kernel(x: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                   rope: torch.Tensor, eps: float, momentum_gamma: float,
                   momentum_first: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)`` by the forward kernel: out in x's dtype, stats fp32 ``[rows, N_STATS]``."""
    batch, seq_len, heads, d = x.shape
    if rope.shape[0] < seq_len or rope.shape[1] != d:  # apply_rope fails on these; the kernel would read past
        raise ValueError(f"RoPE table {tuple(rope.shape)} does not cover {seq_len} tokens of head dim {d}")
    xc = x.contiguous()
    out = torch.empty_like(xc)
    stats = torch.empty(xc.numel() // d, N_STATS, device=x.device, dtype=torch.float32)
    if out.numel():
        grid, block_t, block_h = _grid(xc)
        _qk_path_forward_kernel[grid](xc, rope.contiguous(), gamma.contiguous(), alpha.contiguous(), beta.contiguous(), out,
                                      stats, seq_len, heads, d // 2, eps, momentum_gamma,
                                      **_flags(momentum_gamma, momentum_first), BLOCK_T=block_t, BLOCK_H=block_h)
    return out, stats


def backward_kernel(x: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                    rope: torch.Tensor, stats: torch.Tensor, dout: torch.Tensor, momentum_gamma: float,
                    momentum_first: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dparams)`` by the backward kernel, as ``backward_reference`` (dparams fp32)."""
    batch, seq_len, heads, d = x.shape
    xc = x.contiguous()
    dx = torch.empty_like(xc)
    if not dx.numel():
        return dx, torch.zeros(N_PARAM_GRADS, d, device=x.device, dtype=torch.float32)
    grid, block_t, block_h = _grid(xc)
    partials = torch.empty(grid[0] * grid[1], N_PARAM_GRADS, d, device=x.device, dtype=torch.float32)
    _qk_path_backward_kernel[grid](xc, rope.contiguous(), gamma.contiguous(), alpha.contiguous(), beta.contiguous(),
                                   stats.contiguous(), dout.contiguous(), dx, partials, seq_len, heads, d // 2, momentum_gamma,
                                   **_flags(momentum_gamma, momentum_first), BLOCK_T=block_t, BLOCK_H=block_h)
    return dx, partials.sum(0)


# ---- the op -----------------------------------------------------------------------------------
def _require_kernel(x: torch.Tensor) -> None:
    reason = kernel_unavailable_reason(x.device, (x.dtype,))
    if reason is not None:
        raise RuntimeError(f"the q/k path's Triton kernel cannot run here: {reason}; "
                           f"use NEOLLM_QK_PATH_IMPL 'torch' or 'auto'")


@torch.library.custom_op("neollm::qk_path", mutates_args=())
def qk_path_op(x: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, rope: torch.Tensor,
               eps: float, momentum_gamma: float, momentum_first: str,
               use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)`` for ``x [B, T, heads, d]``, the RoPE table ``rope [>= T, d]`` (cos | sin);
    stats ``[B * T * heads, N_STATS]`` in the compute dtype (backward's input, not differentiable).
    ``use_kernel``: the Triton kernels (CUDA, or the CPU interpreter), else the reference."""
    with torch.autocast(x.device.type, enabled=False):
        if use_kernel:
            _require_kernel(x)
            return forward_kernel(x, gamma, alpha, beta, rope, eps, momentum_gamma, momentum_first)
        return forward_reference(x, gamma, alpha, beta, rope, eps, momentum_gamma, momentum_first)


@qk_path_op.register_fake
def _(x, gamma, alpha, beta, rope, eps, momentum_gamma, momentum_first, use_kernel):
    return x.new_empty(x.shape), x.new_empty(x.numel() // x.shape[-1], N_STATS, dtype=compute_dtype(x))


@torch.library.custom_op("neollm::qk_path_backward", mutates_args=())
def qk_path_backward(x: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                     rope: torch.Tensor, stats: torch.Tensor, dout: torch.Tensor, momentum_gamma: float,
                     momentum_first: str, use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dparams)``: see ``backward_reference``."""
    with torch.autocast(x.device.type, enabled=False):
        if use_kernel:
            _require_kernel(x)
            return backward_kernel(x, gamma, alpha, beta, rope, stats, dout, momentum_gamma, momentum_first)
        return backward_reference(x, gamma, alpha, beta, rope, stats, dout, momentum_gamma, momentum_first)


@qk_path_backward.register_fake
def _(x, gamma, alpha, beta, rope, stats, dout, momentum_gamma, momentum_first, use_kernel):
    return x.new_empty(x.shape), x.new_empty(N_PARAM_GRADS, x.shape[-1], dtype=compute_dtype(x))


def _setup_context(ctx, inputs, output):
    x, gamma, alpha, beta, rope, eps, momentum_gamma, momentum_first, use_kernel = inputs
    stats = output[1]
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(x, gamma, alpha, beta, rope, stats)
    ctx.momentum_gamma, ctx.momentum_first, ctx.use_kernel = momentum_gamma, momentum_first, use_kernel


def _backward(ctx, d_out, d_stats):
    x, gamma, alpha, beta, rope, stats = ctx.saved_tensors
    dx, dp = qk_path_backward(x, gamma, alpha, beta, rope, stats, d_out.contiguous(), ctx.momentum_gamma,
                              ctx.momentum_first, ctx.use_kernel)
    return dx, dp[0].to(gamma.dtype), dp[1].to(alpha.dtype), dp[2].to(beta.dtype), None, None, None, None, None


qk_path_op.register_autograd(_backward, setup_context=_setup_context)

# On NeoLLM's selective-op activation-checkpointing save list (neollm/parallelize.py), as the fused
# PolyNorm GLU: its outputs are SDPA's q and k, which SDPA's backward reads, so keeping them (the
# size of q and k in the activation dtype, and 8 bytes of statistics per head row) spares backward a
# second run of the op's forward.
QK_PATH_OPS = (torch.ops.neollm.qk_path.default,)


# ---- the switch -------------------------------------------------------------------------------
QK_PATH_IMPLS = KERNEL_IMPLS
QK_PATH_IMPL = os.environ.get("NEOLLM_QK_PATH_IMPL", "auto")
"""Which path this op takes (module docstring): "auto" (the default: the Triton kernels on CUDA
where they can run, else the PyTorch reference), "torch" or "triton". Set here or for a whole run by
NEOLLM_QK_PATH_IMPL; an unknown name is an error at the first call."""


def uses_kernel(impl: str, x: torch.Tensor) -> bool:
    """Resolve ``impl`` (one of QK_PATH_IMPLS) for tensors like x: True for the Triton kernels."""
    return resolve_impl(impl, kernel_unavailable_reason(x.device, (x.dtype,)), x.is_cuda,
                        "q/k path impl (qk_path.QK_PATH_IMPL, env NEOLLM_QK_PATH_IMPL)", "NEOLLM_QK_PATH_IMPL")


def qk_path(x: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, rope: torch.Tensor,
            eps: float, momentum_gamma: float, momentum_first: str, impl: str | None = None) -> torch.Tensor:
    """SeeDNorm, RoPE, momentum of x: the fused op where ``impl`` (default ``QK_PATH_IMPL``) resolves
    to the kernels, else the unfused reference (autograd through PyTorch ops)."""
    if uses_kernel(QK_PATH_IMPL if impl is None else impl, x):
        return qk_path_op(x, gamma, alpha, beta, rope, eps, momentum_gamma, momentum_first, True)[0]
    return qk_path_reference(x, gamma, alpha, beta, rope, eps, momentum_gamma, momentum_first)
