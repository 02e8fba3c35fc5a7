"""The PolyNorm GLU product ``PolyNorm(g) * u`` as one custom op: a Triton kernel forward and one
backward, and the plain PyTorch reference they must match.

Per row of F (the MLP hidden size) with ``x = g`` in fp32 (neollm/model/norms.py, class PolyNorm):
``xk = x^k * rk``, ``rk = rsqrt(mean(x^2k) + eps)`` for k = 1, 2, 3; with the exclusive logits,
``ak = sigmoid(logit_k)``, ``R = max(<x1, x1>, proj_eps)``, ``ck = <xk, x1> / R`` and
``xk <- (xk - ak ck x1) * sk``, ``sk = rsqrt(mean((xk - ak ck x1)^2) + eps)`` for k = 2, 3; then
``out = (w0 x3 + w1 x2 + w2 x1 + b) * u``.

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

from neollm.kernels.triton_support import KERNEL_IMPLS, resolve_impl, unavailable_reason
from neollm.precision import compute_dtype, upcast

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA torch builds
    triton = None

N_STATS = 8  # per row: r1, r2, r3, <x1, x1>, c2, c3, s2, s3 (the last four 0 without logits)
N_PARAM_GRADS = 6  # dweight[3], dbias, dlogits[2]


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
                           logits: torch.Tensor | None, eps: float, proj_eps: float) -> torch.Tensor:
    """``PolyNorm(g) * u`` as the unfused MLP computes it (PolyNorm cast back to g's dtype, then the product)."""
    return polynorm_reference(g, weight, bias, logits, eps, proj_eps) * u


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
                      logits: torch.Tensor | None, eps: float, proj_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)`` as the forward kernel returns them: the reference product and the per-row
    statistics ``[rows, N_STATS]`` in the compute dtype (what ``backward_reference`` reads)."""
    n = g.shape[-1]
    x = upcast(g).reshape(-1, n)
    x_sq = x * x
    stats = x.new_zeros(x.shape[0], N_STATS)
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
    return polynorm_glu_reference(g, u, weight, bias, logits, eps, proj_eps), stats


def _rms_backward(dy: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Gradient to z of ``y = z * r``, ``r = rsqrt(mean(z^2) + eps)``."""
    return r * (dy - y * (dy * y).mean(-1, keepdim=True))


def backward_reference(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       logits: torch.Tensor | None, stats: torch.Tensor, dy: torch.Tensor, eps: float,
                       proj_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dg, du, dparams)`` of ``out = PolyNorm(g) * u`` for the upstream gradient ``dy``, the
    backward the kernel implements (module docstring), in the compute dtype from start to end
    (the fused path rounds p once, where the unfused one rounds PolyNorm(g) to g's dtype first).
    ``dparams [N_PARAM_GRADS]``: dweight[3], dbias, dlogits[2] (0 without logits), compute dtype."""
    n = g.shape[-1]
    dt = compute_dtype(g)
    x, uu, dyy = g.reshape(-1, n).to(dt), u.reshape(-1, n).to(dt), dy.reshape(-1, n).to(dt)
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
    return dg.reshape(g.shape).to(g.dtype), du.reshape(u.shape).to(u.dtype), dparams


# ---- the kernels ------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _rsqrt_mean_sq(z, n_cols, eps):
        return 1.0 / tl.sqrt(tl.sum(z * z, axis=0) / n_cols + eps)

    @triton.jit
    def _rms_bwd(dy, y, r, n_cols):
        return r * (dy - y * (tl.sum(dy * y, axis=0) / n_cols))

    @triton.jit
    def _polynorm_glu_forward_kernel(g_ptr, u_ptr, out_ptr, stats_ptr, w_ptr, b_ptr, l_ptr, n_cols, eps, proj_eps,
                                     EXCLUSIVE: tl.constexpr, BLOCK: tl.constexpr):
        """One row: the three norms (and projections), the combination, the product with u."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(g_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        x_sq = x * x
        x_cu = x_sq * x
        r1 = _rsqrt_mean_sq(x, n_cols, eps)
        r2 = _rsqrt_mean_sq(x_sq, n_cols, eps)
        r3 = _rsqrt_mean_sq(x_cu, n_cols, eps)
        x1 = x * r1
        x2 = x_sq * r2
        x3 = x_cu * r3
        q = tl.sum(x1 * x1, axis=0)
        s_base = stats_ptr + row * 8
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
        u = tl.load(u_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (p * u).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _polynorm_glu_backward_kernel(g_ptr, u_ptr, dy_ptr, stats_ptr, w_ptr, b_ptr, l_ptr, dg_ptr, du_ptr, part_ptr,
                                      n_cols, proj_eps, EXCLUSIVE: tl.constexpr, BLOCK: tl.constexpr):
        """One row: dg, du, and the row's partial sums for dweight, dbias, dlogits (6 fp32)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        offs = row * n_cols + cols
        x = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        s_base = stats_ptr + row * 8
        r1 = tl.load(s_base + 0)
        r2 = tl.load(s_base + 1)
        r3 = tl.load(s_base + 2)
        x_sq = x * x
        x1 = x * r1
        x2 = x_sq * r2
        x3 = x_sq * x * r3
        w0 = tl.load(w_ptr).to(tl.float32)
        w1 = tl.load(w_ptr + 1).to(tl.float32)
        w2 = tl.load(w_ptr + 2).to(tl.float32)
        b = tl.load(b_ptr).to(tl.float32)
        if EXCLUSIVE:
            q = tl.load(s_base + 3)
            c2 = tl.load(s_base + 4)
            c3 = tl.load(s_base + 5)
            s2 = tl.load(s_base + 6)
            s3 = tl.load(s_base + 7)
            a2 = 1.0 / (1.0 + tl.exp(-tl.load(l_ptr).to(tl.float32)))
            a3 = 1.0 / (1.0 + tl.exp(-tl.load(l_ptr + 1).to(tl.float32)))
            ref = tl.maximum(q, proj_eps)
            x2p = (x2 - a2 * c2 * x1) * s2
            x3p = (x3 - a3 * c3 * x1) * s3
        else:
            x2p = x2
            x3p = x3
        p = w0 * x3p + w1 * x2p + w2 * x1 + b
        u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(du_ptr + offs, (dy * p).to(du_ptr.dtype.element_ty), mask=ok)
        dp = dy * u
        p_base = part_ptr + row * 6
        tl.store(p_base + 0, tl.sum(dp * x3p, axis=0))
        tl.store(p_base + 1, tl.sum(dp * x2p, axis=0))
        tl.store(p_base + 2, tl.sum(dp * x1, axis=0))
        tl.store(p_base + 3, tl.sum(dp, axis=0))
        dx1 = w2 * dp
        dx2 = w1 * dp
        dx3 = w0 * dp
        if EXCLUSIVE:
            clamp_on = tl.where(q >= proj_eps, 1.0, 0.0)
            # k = 2
            dv2 = _rms_bwd(dx2, x2p, s2, n_cols)
            t2 = tl.sum(dv2 * x1, axis=0)
            tl.store(p_base + 4, -c2 * t2 * a2 * (1.0 - a2))
            dc2 = -a2 * t2
            # k = 3
            dv3 = _rms_bwd(dx3, x3p, s3, n_cols)
            t3 = tl.sum(dv3 * x1, axis=0)
            tl.store(p_base + 5, -c3 * t3 * a3 * (1.0 - a3))
            dc3 = -a3 * t3
            dx1 += (-a2 * c2 * dv2 + dc2 * x2 / ref - 2.0 * clamp_on * dc2 * c2 / ref * x1
                    - a3 * c3 * dv3 + dc3 * x3 / ref - 2.0 * clamp_on * dc3 * c3 / ref * x1)
            dx2 = dv2 + dc2 * x1 / ref
            dx3 = dv3 + dc3 * x1 / ref
        else:
            tl.store(p_base + 4, 0.0)
            tl.store(p_base + 5, 0.0)
        dz1 = _rms_bwd(dx1, x1, r1, n_cols)
        dz2 = _rms_bwd(dx2, x2, r2, n_cols)
        dz3 = _rms_bwd(dx3, x3, r3, n_cols)
        dg = dz1 + 2.0 * x * dz2 + 3.0 * x_sq * dz3
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=ok)


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
                   logits: torch.Tensor | None, eps: float, proj_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)`` by the forward kernel: out in promote(g, u) dtype, stats fp32 ``[rows, N_STATS]``."""
    n = g.shape[-1]
    g2, u2 = _rows(g), _rows(u)
    out = torch.empty(g2.shape, device=g.device, dtype=torch.promote_types(g.dtype, u.dtype))
    stats = torch.empty(g2.shape[0], N_STATS, device=g.device, dtype=torch.float32)
    w, b = weight.contiguous(), bias.contiguous()
    lg = w if logits is None else logits.contiguous()
    if out.numel():
        block, warps = _launch(n)
        _polynorm_glu_forward_kernel[(g2.shape[0],)](g2, u2, out, stats, w, b, lg, n, eps, proj_eps,
                                                     EXCLUSIVE=logits is not None, BLOCK=block, num_warps=warps)
    return out.view(g.shape), stats


def backward_kernel(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    logits: torch.Tensor | None, stats: torch.Tensor, dy: torch.Tensor, eps: float,
                    proj_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dg, du, dparams)`` by the backward kernel, as ``backward_reference`` (dparams fp32)."""
    n = g.shape[-1]
    g2, u2, dy2 = _rows(g), _rows(u), _rows(dy)
    dg = torch.empty(g2.shape, device=g.device, dtype=g.dtype)
    du = torch.empty(u2.shape, device=g.device, dtype=u.dtype)
    partials = torch.zeros(g2.shape[0], N_PARAM_GRADS, device=g.device, dtype=torch.float32)
    w, b = weight.contiguous(), bias.contiguous()
    lg = w if logits is None else logits.contiguous()
    if dg.numel():
        block, warps = _launch(n)
        _polynorm_glu_backward_kernel[(g2.shape[0],)](g2, u2, dy2, stats.contiguous(), w, b, lg, dg, du, partials, n, proj_eps,
                                                      EXCLUSIVE=logits is not None, BLOCK=block, num_warps=warps)
    return dg.view(g.shape), du.view(u.shape), partials.sum(0)


# ---- the op -----------------------------------------------------------------------------------
def _require_kernel(g: torch.Tensor, u: torch.Tensor) -> None:
    reason = kernel_unavailable_reason(g.device, (g.dtype, u.dtype))
    if reason is not None:
        raise RuntimeError(f"PolyNorm GLU's Triton kernel cannot run here: {reason}; "
                           f"use NEOLLM_POLYNORM_IMPL 'torch' or 'auto'")


@torch.library.custom_op("neollm::polynorm_glu", mutates_args=())
def polynorm_glu_op(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    logits: torch.Tensor | None, eps: float, proj_eps: float,
                    use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(PolyNorm(g) * u, stats)`` for ``g, u [..., F]`` of one shape; stats ``[rows, N_STATS]`` in
    the compute dtype (backward's input, not differentiable). ``use_kernel``: the Triton kernels
    (CUDA, or the CPU interpreter), else the reference."""
    with torch.autocast(g.device.type, enabled=False):
        if use_kernel:
            _require_kernel(g, u)
            return forward_kernel(g, u, weight, bias, logits, eps, proj_eps)
        return forward_reference(g, u, weight, bias, logits, eps, proj_eps)


@polynorm_glu_op.register_fake
def _(g, u, weight, bias, logits, eps, proj_eps, use_kernel):
    rows = g.numel() // g.shape[-1] if g.shape[-1] else 0
    return (g.new_empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype)),
            g.new_empty(rows, N_STATS, dtype=compute_dtype(g)))


@torch.library.custom_op("neollm::polynorm_glu_backward", mutates_args=())
def polynorm_glu_backward(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          logits: torch.Tensor | None, stats: torch.Tensor, dy: torch.Tensor, eps: float,
                          proj_eps: float, use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dg, du, dparams)``: see ``backward_reference``."""
    with torch.autocast(g.device.type, enabled=False):
        if use_kernel:
            _require_kernel(g, u)
            return backward_kernel(g, u, weight, bias, logits, stats, dy, eps, proj_eps)
        return backward_reference(g, u, weight, bias, logits, stats, dy, eps, proj_eps)


@polynorm_glu_backward.register_fake
def _(g, u, weight, bias, logits, stats, dy, eps, proj_eps, use_kernel):
    dt = torch.float32 if use_kernel else compute_dtype(g)
    return g.new_empty(g.shape), u.new_empty(u.shape), g.new_empty(N_PARAM_GRADS, dtype=dt)


def _setup_context(ctx, inputs, output):
    g, u, weight, bias, logits, eps, proj_eps, use_kernel = inputs
    stats = output[1]
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(g, u, weight, bias, logits, stats)
    ctx.eps, ctx.proj_eps, ctx.use_kernel = eps, proj_eps, use_kernel


def _backward(ctx, d_out, d_stats):
    g, u, weight, bias, logits, stats = ctx.saved_tensors
    dg, du, dp = polynorm_glu_backward(g, u, weight, bias, logits, stats, d_out.contiguous(), ctx.eps,
                                       ctx.proj_eps, ctx.use_kernel)
    dlogits = None if logits is None else dp[4:6].to(logits.dtype)
    return dg, du, dp[0:3].to(weight.dtype), dp[3:4].to(bias.dtype), dlogits, None, None, None


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


def uses_kernel(impl: str, g: torch.Tensor, u: torch.Tensor) -> bool:
    """Resolve ``impl`` (one of POLYNORM_IMPLS) for these tensors: True for the Triton kernels."""
    return resolve_impl(impl, kernel_unavailable_reason(g.device, (g.dtype, u.dtype)), g.is_cuda,
                        "polynorm impl (polynorm_glu.POLYNORM_IMPL, env NEOLLM_POLYNORM_IMPL)", "NEOLLM_POLYNORM_IMPL")


def polynorm_glu(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 logits: torch.Tensor | None, eps: float, proj_eps: float, impl: str | None = None) -> torch.Tensor:
    """``PolyNorm(g) * u``: the fused op where ``impl`` (default ``POLYNORM_IMPL``) resolves to the
    kernels, else the unfused reference (autograd through PyTorch ops)."""
    if uses_kernel(POLYNORM_IMPL if impl is None else impl, g, u):
        return polynorm_glu_op(g, u, weight, bias, logits, eps, proj_eps, True)[0]
    return polynorm_glu_reference(g, u, weight, bias, logits, eps, proj_eps)
