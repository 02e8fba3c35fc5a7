"""The PolyNorm GLU product ``PolyNorm(g) * u`` as one custom op: a Triton kernel forward and one
backward, and the plain PyTorch reference they must match.

Per row of F (the MLP hidden size) with ``x = g`` in fp32 (neollm/model/norms.py, class PolyNorm):
``xk = x^k * rk``, ``rk = rsqrt(mean(x^2k) + eps)`` for k = 1, 2, 3; with the exclusive logits,
``ak = sigmoid(logit_k)``, ``R = max(<x1, x1>, proj_eps)``, ``ck = <xk, x1> / R`` and
``xk <- (xk - ak ck x1) * sk``, ``sk = rsqrt(mean((xk - ak ck x1)^2) + eps)`` for k = 2, 3; then
``out = (w0 x3 + w1 x2 + w2 x1 + b) * u``.

The gate and up projections' SimpleNorm (SimpleGPT in the MLP, neollm/model/linear.py: ``g = gain_g *
RMSNorm(g_raw)``, likewise u) is folded in (``FOLD_SIMPLENORM``, below; the default): given ``g_gain``
and ``u_gain`` the op takes the raw projection outputs and normalises them itself (``in_eps``), so the normalised [rows, F] tensors are
never written, read back or saved for backward. The backward then also returns the two gains'
gradients, summed over ``ROWS_PER_PROGRAM`` rows in each program and over programs in torch.

Why a kernel: the eager module runs ~20 elementwise ops and 3 (exclusive: 8) row reductions over
[rows, F] in fp32, each a pass over HBM (torch.compile fuses some, not all), and autograd keeps
several F-sized fp32 tensors. Here
forward reads g and u once and writes the product and 8 fp32 numbers per row (the rsqrt values,
<x1, x1>, the projection coefficients); backward reads g, u, the upstream gradient and those
numbers once and writes dg, du and 6 per-row partial sums (weight, bias, logits), summed in torch.

Backward per row, with dp = dy * u (so du = dy * p): the RMS norm ``y = z r`` gives
``dz = r (dy - y mean(dy y))``; the projection ``v = xk - a c x1`` gives
``da = -c <dv, x1>``, ``dc = -a <dv, x1>``, ``dxk = dv + dc x1 / R`` and
``dx1 += -a c dv + dc xk / R - 2 dc c x1 / R`` (the last term only where R is not clamped);
then ``dg = dz1 + 2 x dz2 + 3 x^2 dz3``. ``backward_reference`` is the same in PyTorch, checked
against autograd in fp64 (tests/test_polynorm_glu.py).

Switch: ``POLYNORM_IMPL`` (environment ``NEOLLM_POLYNORM_IMPL``) = "auto" (default: the
kernels where they can run, on CUDA), "torch" (the MLP keeps its unfused PolyNorm module and
product) or "triton" (the kernels; CUDA, fp32/bf16/fp16; an error elsewhere). The MLP takes the
fused op only for mlp_type "polynorm" with no dropout active (training with dropout > 0 keeps the
unfused path: dropout sits on the PolyNorm output). The default is "auto": neollm_135m's real trainer on an H100 ran 1.18x faster with the four
technique kernels (LUCID, PolyNorm GLU, q/k path, epilogue) than with the references, and 1.04x with
the three besides LUCID (BENCHMARKS.md, 2026-12-05).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from neollm.errors import ConfigError
from neollm.kernels.triton_support import KERNEL_IMPLS, resolve_impl, unavailable_reason
from neollm.precision import compute_dtype, upcast

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA torch builds
    triton = None

N_STATS = 10  # per row: r1, r2, r3, <x1, x1>, c2, c3, s2, s3 (0 without logits), rg, ru (0 without gains)
N_PARAM_GRADS = 6  # dweight[3], dbias, dlogits[2]
ROWS_PER_PROGRAM = 32  # backward with gains: rows per program, whose gain gradients it sums in registers


# ---- the reference ----------------------------------------------------------------------------
def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def polynorm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, logits: torch.Tensor | None,
                       eps: float, proj_eps: float) -> torch.Tensor:
    """PolyNorm(x) in x's dtype, fp32 math (neollm/model/norms.py's module calls it; its docstring has
    the formula and sources): the unfused path, which the kernels must match."""
    x32 = upcast(x)
    x_sq = x32 * x32
    x1 = _rms_normalize(x32, eps)
    x2 = _rms_normalize(x_sq, eps)
    x3 = _rms_normalize(x_sq * x32, eps)
    if logits is not None:
        alpha = torch.sigmoid(upcast(logits))
        ref_sq = (x1 * x1).sum(-1, keepdim=True).clamp_min(proj_eps)
        x2 = _rms_normalize(x2 - alpha[0] * ((x2 * x1).sum(-1, keepdim=True) / ref_sq) * x1, eps)
        x3 = _rms_normalize(x3 - alpha[1] * ((x3 * x1).sum(-1, keepdim=True) / ref_sq) * x1, eps)
    w, b = upcast(weight), upcast(bias)
    return (w[0] * x3 + w[1] * x2 + w[2] * x1 + b).to(x.dtype)


def polynorm_glu_reference(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           logits: torch.Tensor | None, eps: float, proj_eps: float,
                           g_gain: torch.Tensor | None = None, u_gain: torch.Tensor | None = None,
                           in_eps: float = 0.0) -> torch.Tensor:
    """``PolyNorm(g) * u`` as the unfused MLP computes it (PolyNorm cast back to g's dtype, then the
    product); with gains, g and u are first the SimpleNorm outputs (nn.RMSNorm's own function)."""
    if g_gain is not None:
        g = F.rms_norm(g, (g.shape[-1],), g_gain, in_eps)
        u = F.rms_norm(u, (u.shape[-1],), u_gain, in_eps)
    return polynorm_reference(g, weight, bias, logits, eps, proj_eps) * u


def _check_gains(g_gain: torch.Tensor | None, u_gain: torch.Tensor | None, in_eps: float) -> None:
    if (g_gain is None) != (u_gain is None):
        raise ValueError("polynorm_glu: give both SimpleNorm gains (g_gain, u_gain) or neither")
    if g_gain is not None and not in_eps > 0:
        raise ValueError(f"polynorm_glu: with SimpleNorm gains in_eps must be > 0 (the norm's eps), got {in_eps}")


def _input_norm(z: torch.Tensor, gain: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain * z * r, r) with ``r = rsqrt(mean(z^2) + eps)`` per row, in z's dtype."""
    r = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
    return z * r * upcast(gain).to(z.dtype), r


def _branches(x: torch.Tensor, stats: torch.Tensor, logits: torch.Tensor | None, proj_eps: float):
    """x1, x2, x3 (exclusive: the projected, renormalised x2', x3'), the pre-projection x2, x3, and
    R = max(<x1, x1>, proj_eps), from the saved row statistics ``stats [rows, N_STATS]``."""
    st = [stats[:, i:i + 1] for i in range(N_STATS)]
    x_sq = x * x
    x1, x2, x3 = x * st[0], x_sq * st[1], x_sq * x * st[2]
    ref = st[3].clamp_min(proj_eps)
    if logits is None:
        return x1, x2, x3, x2, x3, ref
    a = torch.sigmoid(upcast(logits).to(x.dtype))
    x2p = (x2 - a[0] * st[4] * x1) * st[6]
    x3p = (x3 - a[1] * st[5] * x1) * st[7]
    return x1, x2p, x3p, x2, x3, ref


def forward_reference(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      logits: torch.Tensor | None, eps: float, proj_eps: float, g_gain: torch.Tensor | None = None,
                      u_gain: torch.Tensor | None = None, in_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)`` as the forward kernel returns them: the reference product and the per-row
    statistics ``[rows, N_STATS]`` in the compute dtype (what ``backward_reference`` reads). With
    gains the normalised g and u stay in the compute dtype (the unfused path rounds them to g's)."""
    n = g.shape[-1]
    x = upcast(g).reshape(-1, n)
    stats = x.new_zeros(x.shape[0], N_STATS)
    if g_gain is not None:
        x, rg = _input_norm(x, g_gain, in_eps)
        un, ru = _input_norm(upcast(u).reshape(-1, n), u_gain, in_eps)
        stats[:, 8], stats[:, 9] = rg[:, 0], ru[:, 0]
        out = (polynorm_reference(x, weight, bias, logits, eps, proj_eps) * un).to(
            torch.promote_types(g.dtype, u.dtype))
    x_sq = x * x
    for k, z in enumerate((x, x_sq, x_sq * x)):
        stats[:, k] = torch.rsqrt(z.pow(2).mean(-1) + eps)
    x1, x2, x3 = x * stats[:, 0:1], x_sq * stats[:, 1:2], x_sq * x * stats[:, 2:3]
    stats[:, 3] = (x1 * x1).sum(-1)
    if logits is not None:
        a = torch.sigmoid(upcast(logits).to(x.dtype))
        ref = stats[:, 3:4].clamp_min(proj_eps)
        for k, (xk, ak) in enumerate(((x2, a[0]), (x3, a[1]))):
            ck = (xk * x1).sum(-1, keepdim=True) / ref
            stats[:, 4 + k] = ck[:, 0]
            stats[:, 6 + k] = torch.rsqrt((xk - ak * ck * x1).pow(2).mean(-1) + eps)
    if g_gain is None:
        out = polynorm_glu_reference(g, u, weight, bias, logits, eps, proj_eps)
    return out.reshape(g.shape), stats


def _rms_backward(dy: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Gradient to z of ``y = z * r``, ``r = rsqrt(mean(z^2) + eps)``."""
    return r * (dy - y * (dy * y).mean(-1, keepdim=True))


def backward_reference(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       logits: torch.Tensor | None, stats: torch.Tensor, dy: torch.Tensor, eps: float,
                       proj_eps: float, g_gain: torch.Tensor | None = None, u_gain: torch.Tensor | None = None,
                       in_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dg, du, dparams, dgains)`` of ``out = PolyNorm(g) * u`` for the upstream gradient ``dy``, the
    backward the kernel implements (module docstring), in the compute dtype from start to end
    (the fused path rounds p once, where the unfused one rounds PolyNorm(g) to g's dtype first).
    ``dparams [N_PARAM_GRADS]``: dweight[3], dbias, dlogits[2] (0 without logits), compute dtype;
    ``dgains [2, F]``: the gains' gradients (``[0]`` without gains)."""
    n = g.shape[-1]
    dt = compute_dtype(g)
    x, uu, dyy = g.reshape(-1, n).to(dt), u.reshape(-1, n).to(dt), dy.reshape(-1, n).to(dt)
    dgains = torch.zeros(0, dtype=dt, device=g.device)
    if g_gain is not None:
        rg, ru = stats[:, 8:9].to(dt), stats[:, 9:10].to(dt)
        g_hat, u_hat = x * rg, uu * ru
        x, uu = g_hat * upcast(g_gain).to(dt), u_hat * upcast(u_gain).to(dt)
    w, b = upcast(weight).to(dt), upcast(bias).to(dt)
    x1, x2p, x3p, x2, x3, ref = _branches(x, stats.to(dt), logits, proj_eps)
    p = w[0] * x3p + w[1] * x2p + w[2] * x1 + b
    du = dyy * p
    dp = dyy * uu
    dparams = torch.zeros(N_PARAM_GRADS, dtype=dt, device=g.device)
    dparams[0], dparams[1], dparams[2], dparams[3] = (dp * x3p).sum(), (dp * x2p).sum(), (dp * x1).sum(), dp.sum()
    dx1, dx2, dx3 = w[2] * dp, w[1] * dp, w[0] * dp
    if logits is not None:
        a = torch.sigmoid(upcast(logits).to(dt))
        unclamped = (stats[:, 3:4].to(dt) >= proj_eps).to(dt)
        grads = []
        for k, (xk, xkp, dxkp) in enumerate(((x2, x2p, dx2), (x3, x3p, dx3))):
            ck, sk = stats[:, 4 + k:5 + k].to(dt), stats[:, 6 + k:7 + k].to(dt)
            dv = _rms_backward(dxkp, xkp, sk)
            t = (dv * x1).sum(-1, keepdim=True)
            dparams[4 + k] = (-ck * t).sum() * a[k] * (1 - a[k])
            dc = -a[k] * t
            dx1 = dx1 - a[k] * ck * dv + dc * xk / ref - 2 * unclamped * dc * ck / ref * x1
            grads.append(dv + dc * x1 / ref)
        dx2, dx3 = grads
    st = stats.to(dt)
    dz1 = _rms_backward(dx1, x1, st[:, 0:1])
    dz2 = _rms_backward(dx2, x2, st[:, 1:2])
    dz3 = _rms_backward(dx3, x3, st[:, 2:3])
    dg = dz1 + 2 * x * dz2 + 3 * x * x * dz3
    if g_gain is not None:
        dgains = torch.stack([(dg * g_hat).sum(0), (du * u_hat).sum(0)])
        dg = _rms_backward(dg * upcast(g_gain).to(dt), g_hat, rg)
        du = _rms_backward(du * upcast(u_gain).to(dt), u_hat, ru)
    return dg.reshape(g.shape).to(g.dtype), du.reshape(u.shape).to(u.dtype), dparams, dgains


# ---- the kernels ------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _rsqrt_mean_sq(z, n_cols, eps):
        return 1.0 / tl.sqrt(tl.sum(z * z, axis=0) / n_cols + eps)

    @triton.jit
    def _rms_bwd(dy, y, r, n_cols):
        return r * (dy - y * (tl.sum(dy * y, axis=0) / n_cols))

    @triton.jit
    def _polynorm_glu_forward_kernel(g_ptr, u_ptr, out_ptr, stats_ptr, w_ptr, b_ptr, l_ptr, gg_ptr, gu_ptr, n_cols,
                                     eps, proj_eps, in_eps, EXCLUSIVE: tl.constexpr, IN_NORM: tl.constexpr,
                                     NS: tl.constexpr, BLOCK: tl.constexpr):
        """One row: (the input norms,) the three norms (and projections), the combination, the product with u."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(g_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        s_base = stats_ptr + row * NS
        if IN_NORM:
            rg = _rsqrt_mean_sq(x, n_cols, in_eps)
            ru = _rsqrt_mean_sq(u, n_cols, in_eps)
            x = x * rg * tl.load(gg_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            u = u * ru * tl.load(gu_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(s_base + 8, rg)
            tl.store(s_base + 9, ru)
        else:
            tl.store(s_base + 8, 0.0)
            tl.store(s_base + 9, 0.0)
        x_sq = x * x
        x_cu = x_sq * x
        r1 = _rsqrt_mean_sq(x, n_cols, eps)
        r2 = _rsqrt_mean_sq(x_sq, n_cols, eps)
        r3 = _rsqrt_mean_sq(x_cu, n_cols, eps)
        x1 = x * r1
        x2 = x_sq * r2
        x3 = x_cu * r3
        q = tl.sum(x1 * x1, axis=0)
        tl.store(s_base + 0, r1)
        tl.store(s_base + 1, r2)
        tl.store(s_base + 2, r3)
        tl.store(s_base + 3, q)
        if EXCLUSIVE:
            a2 = 1.0 / (1.0 + tl.exp(-tl.load(l_ptr).to(tl.float32)))
            a3 = 1.0 / (1.0 + tl.exp(-tl.load(l_ptr + 1).to(tl.float32)))
            ref = tl.maximum(q, proj_eps)
            c2 = tl.sum(x2 * x1, axis=0) / ref
            c3 = tl.sum(x3 * x1, axis=0) / ref
            v2 = x2 - a2 * c2 * x1
            v3 = x3 - a3 * c3 * x1
            s2 = _rsqrt_mean_sq(v2, n_cols, eps)
            s3 = _rsqrt_mean_sq(v3, n_cols, eps)
            x2 = v2 * s2
            x3 = v3 * s3
            tl.store(s_base + 4, c2)
            tl.store(s_base + 5, c3)
            tl.store(s_base + 6, s2)
            tl.store(s_base + 7, s3)
        else:
            tl.store(s_base + 4, 0.0)
            tl.store(s_base + 5, 0.0)
            tl.store(s_base + 6, 0.0)
            tl.store(s_base + 7, 0.0)
        w0 = tl.load(w_ptr).to(tl.float32)
        w1 = tl.load(w_ptr + 1).to(tl.float32)
        w2 = tl.load(w_ptr + 2).to(tl.float32)
        b = tl.load(b_ptr).to(tl.float32)
        p = w0 * x3 + w1 * x2 + w2 * x1 + b
        tl.store(out_ptr + row * n_cols + cols, (p * u).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _polynorm_glu_backward_kernel(g_ptr, u_ptr, dy_ptr, stats_ptr, w_ptr, b_ptr, l_ptr, gg_ptr, gu_ptr, dg_ptr,
                                      du_ptr, part_ptr, dgain_ptr, n_rows, n_cols, proj_eps, EXCLUSIVE: tl.constexpr,
                                      IN_NORM: tl.constexpr, ROWS: tl.constexpr, NS: tl.constexpr,
                                      BLOCK: tl.constexpr):
        """ROWS rows: dg, du, and each row's partial sums for dweight, dbias, dlogits (6 fp32); with the
        input norms, the program's sums of the gains' gradients ([2, F] fp32 at ``dgain_ptr``)."""
        pid = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        col_ok = cols < n_cols
        w0 = tl.load(w_ptr).to(tl.float32)
        w1 = tl.load(w_ptr + 1).to(tl.float32)
        w2 = tl.load(w_ptr + 2).to(tl.float32)
        b = tl.load(b_ptr).to(tl.float32)
        if EXCLUSIVE:
            a2 = 1.0 / (1.0 + tl.exp(-tl.load(l_ptr).to(tl.float32)))
            a3 = 1.0 / (1.0 + tl.exp(-tl.load(l_ptr + 1).to(tl.float32)))
        if IN_NORM:
            gam_g = tl.load(gg_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            gam_u = tl.load(gu_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc_g = tl.zeros([BLOCK], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ROWS):
            row = pid * ROWS + i
            row_ok = row < n_rows
            ok = cols < tl.where(row_ok, n_cols, 0)  # (not col_ok & row_ok: the interpreter refuses scalar & vector)
            offs = row * n_cols + cols
            x = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            s_base = stats_ptr + row * NS
            if IN_NORM:
                rg = tl.load(s_base + 8, mask=row_ok, other=0.0)
                ru = tl.load(s_base + 9, mask=row_ok, other=0.0)
                g_hat = x * rg
                u_hat = u * ru
                x = g_hat * gam_g
                u = u_hat * gam_u
            r1 = tl.load(s_base + 0, mask=row_ok, other=0.0)
            r2 = tl.load(s_base + 1, mask=row_ok, other=0.0)
            r3 = tl.load(s_base + 2, mask=row_ok, other=0.0)
            x_sq = x * x
            x1 = x * r1
            x2 = x_sq * r2
            x3 = x_sq * x * r3
            if EXCLUSIVE:
                q = tl.load(s_base + 3, mask=row_ok, other=0.0)
                c2 = tl.load(s_base + 4, mask=row_ok, other=0.0)
                c3 = tl.load(s_base + 5, mask=row_ok, other=0.0)
                s2 = tl.load(s_base + 6, mask=row_ok, other=0.0)
                s3 = tl.load(s_base + 7, mask=row_ok, other=0.0)
                ref = tl.maximum(q, proj_eps)
                x2p = (x2 - a2 * c2 * x1) * s2
                x3p = (x3 - a3 * c3 * x1) * s3
            else:
                x2p = x2
                x3p = x3
            p = w0 * x3p + w1 * x2p + w2 * x1 + b
            dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            du = dy * p
            dp = dy * u
            p_base = part_ptr + row * 6
            tl.store(p_base + 0, tl.sum(dp * x3p, axis=0), mask=row_ok)
            tl.store(p_base + 1, tl.sum(dp * x2p, axis=0), mask=row_ok)
            tl.store(p_base + 2, tl.sum(dp * x1, axis=0), mask=row_ok)
            tl.store(p_base + 3, tl.sum(dp, axis=0), mask=row_ok)
            dx1 = w2 * dp
            dx2 = w1 * dp
            dx3 = w0 * dp
            if EXCLUSIVE:
                clamp_on = tl.where(q >= proj_eps, 1.0, 0.0)
                # k = 2
                dv2 = _rms_bwd(dx2, x2p, s2, n_cols)
                t2 = tl.sum(dv2 * x1, axis=0)
                tl.store(p_base + 4, -c2 * t2 * a2 * (1.0 - a2), mask=row_ok)
                dc2 = -a2 * t2
                # k = 3
                dv3 = _rms_bwd(dx3, x3p, s3, n_cols)
                t3 = tl.sum(dv3 * x1, axis=0)
                tl.store(p_base + 5, -c3 * t3 * a3 * (1.0 - a3), mask=row_ok)
                dc3 = -a3 * t3
                dx1 += (-a2 * c2 * dv2 + dc2 * x2 / ref - 2.0 * clamp_on * dc2 * c2 / ref * x1
                        - a3 * c3 * dv3 + dc3 * x3 / ref - 2.0 * clamp_on * dc3 * c3 / ref * x1)
                dx2 = dv2 + dc2 * x1 / ref
                dx3 = dv3 + dc3 * x1 / ref
            else:
                tl.store(p_base + 4, 0.0, mask=row_ok)
                tl.store(p_base + 5, 0.0, mask=row_ok)
            dz1 = _rms_bwd(dx1, x1, r1, n_cols)
            dz2 = _rms_bwd(dx2, x2, r2, n_cols)
            dz3 = _rms_bwd(dx3, x3, r3, n_cols)
            dg = dz1 + 2.0 * x * dz2 + 3.0 * x_sq * dz3
            if IN_NORM:
                acc_g += dg * g_hat
                acc_u += du * u_hat
                dg = _rms_bwd(dg * gam_g, g_hat, rg, n_cols)
                du = _rms_bwd(du * gam_u, u_hat, ru, n_cols)
            tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=ok)
            tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=ok)
        if IN_NORM:
            tl.store(dgain_ptr + pid * 2 * n_cols + cols, acc_g, mask=col_ok)
            tl.store(dgain_ptr + pid * 2 * n_cols + n_cols + cols, acc_u, mask=col_ok)


def kernel_unavailable_reason(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """Why the Triton kernels cannot serve tensors on ``device`` of these dtypes (None when they can)."""
    return unavailable_reason(device, dtypes)


def _launch(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the whole row in one block (F up to a few thousand). Not yet timed."""
    block = triton.next_power_of_2(n_cols)
    return block, 4 if block <= 1024 else 8


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1, t.shape[-1])


def forward_kernel(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   logits: torch.Tensor | None, eps: float, proj_eps: float, g_gain: torch.Tensor | None = None,
                   u_gain: torch.Tensor | None = None, in_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)`` by the forward kernel: out in promote(g, u) dtype, stats fp32 ``[rows, N_STATS]``."""
    n = g.shape[-1]
    g2, u2 = _rows(g), _rows(u)
    out = torch.empty(g2.shape, device=g.device, dtype=torch.promote_types(g.dtype, u.dtype))
    stats = torch.empty(g2.shape[0], N_STATS, device=g.device, dtype=torch.float32)
    w, b = weight.contiguous(), bias.contiguous()
    lg = w if logits is None else logits.contiguous()
    if out.numel():
        block, warps = _launch(n)
        gg, gu = (w, w) if g_gain is None else (g_gain.contiguous(), u_gain.contiguous())
        _polynorm_glu_forward_kernel[(g2.shape[0],)](g2, u2, out, stats, w, b, lg, gg, gu, n, eps, proj_eps, in_eps,
                                                     EXCLUSIVE=logits is not None, IN_NORM=g_gain is not None,
                                                     NS=N_STATS, BLOCK=block, num_warps=warps)
    return out.view(g.shape), stats


def backward_kernel(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    logits: torch.Tensor | None, stats: torch.Tensor, dy: torch.Tensor, eps: float,
                    proj_eps: float, g_gain: torch.Tensor | None = None, u_gain: torch.Tensor | None = None,
                    in_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dg, du, dparams, dgains)`` by the backward kernel, as ``backward_reference`` (dparams and
    dgains fp32). Without gains one row per program; with them ``ROWS_PER_PROGRAM``."""
    n = g.shape[-1]
    g2, u2, dy2 = _rows(g), _rows(u), _rows(dy)
    dg = torch.empty(g2.shape, device=g.device, dtype=g.dtype)
    du = torch.empty(u2.shape, device=g.device, dtype=u.dtype)
    partials = torch.zeros(g2.shape[0], N_PARAM_GRADS, device=g.device, dtype=torch.float32)
    w, b = weight.contiguous(), bias.contiguous()
    lg = w if logits is None else logits.contiguous()
    rows_per_program = 1 if g_gain is None else ROWS_PER_PROGRAM
    programs = triton.cdiv(g2.shape[0], rows_per_program)
    gain_parts = torch.zeros(programs if g_gain is not None else 0, 2, n, device=g.device, dtype=torch.float32)
    if dg.numel():
        block, warps = _launch(n)
        gg, gu = (w, w) if g_gain is None else (g_gain.contiguous(), u_gain.contiguous())
        _polynorm_glu_backward_kernel[(programs,)](
            g2, u2, dy2, stats.contiguous(), w, b, lg, gg, gu, dg, du, partials, gain_parts, g2.shape[0], n, proj_eps,
            EXCLUSIVE=logits is not None, IN_NORM=g_gain is not None, ROWS=rows_per_program, NS=N_STATS, BLOCK=block,
            num_warps=warps)
    dgains = gain_parts.sum(0) if g_gain is not None else partials.new_zeros(0)
    return dg.view(g.shape), du.view(u.shape), partials.sum(0), dgains


# ---- the op -----------------------------------------------------------------------------------
def _require_kernel(g: torch.Tensor, u: torch.Tensor) -> None:
    reason = kernel_unavailable_reason(g.device, (g.dtype, u.dtype))
    if reason is not None:
        raise RuntimeError(f"PolyNorm GLU's Triton kernel cannot run here: {reason}; "
                           f"use NEOLLM_POLYNORM_IMPL 'torch' or 'auto'")


@torch.library.custom_op("neollm::polynorm_glu", mutates_args=())
def polynorm_glu_op(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    logits: torch.Tensor | None, eps: float, proj_eps: float, use_kernel: bool,
                    g_gain: torch.Tensor | None = None, u_gain: torch.Tensor | None = None,
                    in_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(PolyNorm(g) * u, stats)`` for ``g, u [..., F]`` of one shape; stats ``[rows, N_STATS]`` in
    the compute dtype (backward's input, not differentiable). ``use_kernel``: the Triton kernels
    (CUDA, or the CPU interpreter), else the reference. With ``g_gain, u_gain [F]``, g and u are
    raw projection outputs and SimpleNorm (``gain * RMSNorm(z)``, ``in_eps``) is applied to both first."""
    _check_gains(g_gain, u_gain, in_eps)
    with torch.autocast(g.device.type, enabled=False):
        if use_kernel:
            _require_kernel(g, u)
            return forward_kernel(g, u, weight, bias, logits, eps, proj_eps, g_gain, u_gain, in_eps)
        return forward_reference(g, u, weight, bias, logits, eps, proj_eps, g_gain, u_gain, in_eps)


@polynorm_glu_op.register_fake
def _(g, u, weight, bias, logits, eps, proj_eps, use_kernel, g_gain=None, u_gain=None, in_eps=0.0):
    rows = g.numel() // g.shape[-1] if g.shape[-1] else 0
    return (g.new_empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype)),
            g.new_empty(rows, N_STATS, dtype=compute_dtype(g)))


@torch.library.custom_op("neollm::polynorm_glu_backward", mutates_args=())
def polynorm_glu_backward(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          logits: torch.Tensor | None, stats: torch.Tensor, dy: torch.Tensor, eps: float,
                          proj_eps: float, use_kernel: bool, g_gain: torch.Tensor | None = None,
                          u_gain: torch.Tensor | None = None,
                          in_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dg, du, dparams, dgains)``: see ``backward_reference``."""
    with torch.autocast(g.device.type, enabled=False):
        if use_kernel:
            _require_kernel(g, u)
            return backward_kernel(g, u, weight, bias, logits, stats, dy, eps, proj_eps, g_gain, u_gain, in_eps)
        return backward_reference(g, u, weight, bias, logits, stats, dy, eps, proj_eps, g_gain, u_gain, in_eps)


@polynorm_glu_backward.register_fake
def _(g, u, weight, bias, logits, stats, dy, eps, proj_eps, use_kernel, g_gain=None, u_gain=None, in_eps=0.0):
    dt = torch.float32 if use_kernel else compute_dtype(g)
    gains = (2, g.shape[-1]) if g_gain is not None else (0,)
    return (g.new_empty(g.shape), u.new_empty(u.shape), g.new_empty(N_PARAM_GRADS, dtype=dt),
            g.new_empty(gains, dtype=dt))


def _setup_context(ctx, inputs, output):
    g, u, weight, bias, logits, eps, proj_eps, use_kernel, g_gain, u_gain, in_eps = inputs
    stats = output[1]
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(g, u, weight, bias, logits, stats, g_gain, u_gain)
    ctx.eps, ctx.proj_eps, ctx.use_kernel, ctx.in_eps = eps, proj_eps, use_kernel, in_eps


def _backward(ctx, d_out, d_stats):
    g, u, weight, bias, logits, stats, g_gain, u_gain = ctx.saved_tensors
    dg, du, dp, dgains = polynorm_glu_backward(g, u, weight, bias, logits, stats, d_out.contiguous(), ctx.eps,
                                               ctx.proj_eps, ctx.use_kernel, g_gain, u_gain, ctx.in_eps)
    dlogits = None if logits is None else dp[4:6].to(logits.dtype)
    dg_gain = du_gain = None
    if g_gain is not None:
        dg_gain, du_gain = dgains[0].to(g_gain.dtype), dgains[1].to(u_gain.dtype)
    return (dg, du, dp[0:3].to(weight.dtype), dp[3:4].to(bias.dtype), dlogits, None, None, None,
            dg_gain, du_gain, None)


polynorm_glu_op.register_autograd(_backward, setup_context=_setup_context)

# On NeoLLM's selective-op activation-checkpointing save list (neollm/parallelize.py), as LUCID's solve:
# its output (the down projection's input) and row statistics are kept instead of a second forward pass.
POLYNORM_OPS = (torch.ops.neollm.polynorm_glu.default,)


# ---- the switch -------------------------------------------------------------------------------
POLYNORM_IMPLS = KERNEL_IMPLS
POLYNORM_IMPL = os.environ.get("NEOLLM_POLYNORM_IMPL", "auto")
"""Which path this op takes (module docstring): "auto" (the default: the Triton kernels on CUDA
where they can run, else the PyTorch reference), "torch" or "triton". Set here or for a whole run by
NEOLLM_POLYNORM_IMPL; an unknown name is an error at the first call."""


FOLD_SIMPLENORM_CHOICES = ("0", "1")
FOLD_SIMPLENORM = os.environ.get("NEOLLM_POLYNORM_FOLD_SIMPLENORM", "1")
""""1" (the default): the MLP hands the gate's and up's SimpleNorm to the fused op (g_gain / u_gain, module
docstring); "0": it normalises them itself (two compiled RMS norms) and the op gets the normalised tensors.
On an H100 (BENCHMARKS.md, 2026-12-08; tools/bench_polynorm.py --simplenorm, neollm_135m's shape) the fold
took 1.11 ms forward + backward against 1.71 apart (exclusive: 1.44 against 2.21) and 327 MiB against
516; tools/bench.py's neollm_135m 322.1k tok/s against 313.1k, peak 15.2 GiB against 17.4."""


def fold_simplenorm() -> bool:
    """FOLD_SIMPLENORM, validated (an unknown value is an error at the first MLP call)."""
    if FOLD_SIMPLENORM not in FOLD_SIMPLENORM_CHOICES:
        raise ConfigError(f"NEOLLM_POLYNORM_FOLD_SIMPLENORM (polynorm_glu.FOLD_SIMPLENORM) must be 0 or 1, "
                          f"got {FOLD_SIMPLENORM!r}")
    return FOLD_SIMPLENORM == "1"


def uses_kernel(impl: str, g: torch.Tensor, u: torch.Tensor) -> bool:
    """Resolve ``impl`` (one of POLYNORM_IMPLS) for these tensors: True for the Triton kernels."""
    return resolve_impl(impl, kernel_unavailable_reason(g.device, (g.dtype, u.dtype)), g.is_cuda,
                        "polynorm impl (polynorm_glu.POLYNORM_IMPL, env NEOLLM_POLYNORM_IMPL)", "NEOLLM_POLYNORM_IMPL")


def polynorm_glu(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 logits: torch.Tensor | None, eps: float, proj_eps: float, impl: str | None = None,
                 g_gain: torch.Tensor | None = None, u_gain: torch.Tensor | None = None,
                 in_eps: float = 0.0) -> torch.Tensor:
    """``PolyNorm(g) * u`` (with gains: of the SimpleNormed g and u): the fused op where ``impl``
    (default ``POLYNORM_IMPL``) resolves to the kernels, else the unfused reference (autograd through
    PyTorch ops)."""
    if uses_kernel(POLYNORM_IMPL if impl is None else impl, g, u):
        return polynorm_glu_op(g, u, weight, bias, logits, eps, proj_eps, True, g_gain, u_gain, in_eps)[0]
    return polynorm_glu_reference(g, u, weight, bias, logits, eps, proj_eps, g_gain, u_gain, in_eps)
