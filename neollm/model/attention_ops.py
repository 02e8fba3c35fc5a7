"""Functional pieces of NeoLLM's full attention (see ``neollm/model/attention.py`` for the order,
the papers and the interpretations).

Shapes: per-head tensors are ``[B, T, heads, d]`` (the projection layout) unless a function says
otherwise. Every normalisation / reduction runs in ``compute_dtype(x)`` (fp32, or fp64 when the
input is fp64) and the result is cast back to the input's dtype. None of these functions branch
on tensor values, so they trace into one graph under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs (the tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dim, in the compute dtype (not cast back)."""
    xf = x.to(compute_dtype(x))
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with a gain ``weight [d]`` (shared by all heads)."""
    return (rms_normalize(x, eps) * weight.to(compute_dtype(x))).to(x.dtype)


def seednorm(x: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
             eps: float) -> torch.Tensor:
    """SeeDNorm (arXiv 2510.22777): ``(tanh(<x, beta>) * alpha + gamma) * x / rms(x)``.

    ``x [..., d]``; ``gamma, alpha, beta [d]``; the dot product gives one scalar per vector.
    """
    dt = compute_dtype(x)
    xf = x.to(dt)
    s = torch.tanh(xf @ beta.to(dt)).unsqueeze(-1)  # [..., 1]
    scale = s * alpha.to(dt) + gamma.to(dt)
    return (scale * rms_normalize(xf, eps)).to(x.dtype)


def mix_heads(x: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    """Head-level linear composition: ``out[..., j, :] = sum_i mixing[j, i] * x[..., i, :]``.

    The einsum returns a head-dim stride of Hkv, which sent SDPA to its T x T math fallback on GPU:
    the result is made contiguous. (A broadcast matmul instead gave results that differ in the last
    bit between grad and no-grad mode, which breaks exact checks of exported models.)"""
    return torch.einsum("btid,ji->btjd", x, mixing.to(x.dtype)).contiguous()


def head_group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """GroupNorm with one group per head: LayerNorm of each head's ``d`` channels, then the
    per-channel affine ``weight, bias [heads, d]``."""
    dt = compute_dtype(x)
    xf = x.to(dt)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    return (y * weight.to(dt) + bias.to(dt)).to(x.dtype)


def momentum_shift(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Momentum (arXiv 2602.04902): ``x_t + gamma * (x_t - x_{t-1})`` along dim 1, with
    ``x_{-1} := x_0`` so the first velocity is 0. Causal (uses only t-1)."""
    previous = torch.cat([x[:, :1], x[:, :-1]], dim=1)
    return x + gamma * (x - previous)


def lucid_preconditioner(k: torch.Tensor, eps: float) -> torch.Tensor:
    """LUCID's ``P = tril(exp(K_rn K_rn^T / sqrt(d) - sqrt(d)))``, ``k [B, Hkv, T, d]`` ->
    ``[B, Hkv, T, T]`` in the compute dtype.

    Keys are RMS-normalised (no gain), so ``||k_rn||^2 = d * ms / (ms + eps) <= d``: the exponent
    is 0 (up to eps) on the diagonal and, by Cauchy-Schwarz, <= 0 everywhere: every entry lies in
    ``(0, 1]``, nothing can overflow. The solve treats the diagonal as exactly 1.
    """
    return _preconditioner_from_normalized(rms_normalize(k, eps))


def _preconditioner_from_normalized(kr: torch.Tensor) -> torch.Tensor:
    d = kr.shape[-1]
    gram = kr @ kr.transpose(-1, -2)
    return torch.exp(gram / math.sqrt(d) - math.sqrt(d)).tril()


class _LucidSolve(torch.autograd.Function):
    """``X = P^{-1} V`` with ``P`` from the normalised keys ``kr``, keeping ``kr`` and ``X`` for
    backward instead of the [T x T] ``P``.

    Why: through plain autograd, the solve and the exp keep P (and exp's output) in fp32 for
    backward: [B, Hkv, T, T] per layer, 268 MB per layer at 64 x 512 tokens with 4 KV heads, the
    largest activation of NeoLLM-135M. Backward rebuilds P from ``kr`` (one [T x d] x [d x T] matmul
    and an exp, under the forward's autocast state, so it is the same P) and applies the
    gradients of a unit-lower-triangular solve: ``dV = P^-T dX``, ``dP = -tril_-1(dV X^T)`` (the
    diagonal is taken as 1, so it gets none), ``dS = dP * P`` through the exp, and ``dkr = (dS + dS^T)
    kr / sqrt(d)`` through the Gram matrix.
    """

    @staticmethod
    def forward(ctx, kr: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        device = kr.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        p = _preconditioner_from_normalized(kr)
        x = torch.linalg.solve_triangular(p, v.to(p.dtype), upper=False, unitriangular=True)
        ctx.save_for_backward(kr, x)
        ctx.v_dtype = v.dtype
        return x

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        kr, x = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            p = _preconditioner_from_normalized(kr)
        with torch.autocast(device, enabled=False):
            grad_x = grad_x.to(p.dtype)
            grad_v = torch.linalg.solve_triangular(p.mT, grad_x, upper=True, unitriangular=True)
            grad_s = -(grad_v @ x.mT).tril(-1) * p
            grad_s = (grad_s + grad_s.mT) / math.sqrt(kr.shape[-1])
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # the Gram matmul's dtype
            grad_kr = grad_s @ kr
        return grad_kr.to(kr.dtype), grad_v.to(ctx.v_dtype)


def lucid_values(k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """LUCID (arXiv 2602.10410): ``X = P^{-1} V`` per KV head; ``k, v [B, Hkv, T, d]``.

    One unit-lower-triangular solve in the compute dtype (fp32 on bf16 runs); returns v's dtype.
    Backward recomputes P instead of keeping it (``_LucidSolve``).
    """
    x = _LucidSolve.apply(rms_normalize(k, eps), v)
    # The solver may return a column-major result; SDPA's fused kernels need a contiguous head dim.
    return x.to(v.dtype).contiguous()


def causal_mean(v: torch.Tensor) -> torch.Tensor:
    """``mean_{j <= i} v_j`` along dim 2 of ``v [B, Hkv, T, d]`` (a cumsum, no T x T matrix)."""
    dt = compute_dtype(v)
    seq_len = v.shape[2]
    count = torch.arange(1, seq_len + 1, device=v.device, dtype=dt).view(1, 1, seq_len, 1)
    return (torch.cumsum(v.to(dt), dim=2) / count).to(v.dtype)


def grouped(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """``[B, T, H, d]`` -> ``[B, T, Hkv, g, d]`` (query head h = kv * g + i serves KV head kv)."""
    b, t, h, d = x.shape
    return x.view(b, t, n_kv_heads, h // n_kv_heads, d)


def exclusive(y: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """XSA (arXiv 2603.09078): ``z = y - <y, v> / (||v||^2 + eps) * v`` per head.

    ``y [B, T, H, d]`` attention output; ``v [B, T, Hkv, d]`` each token's own value; query head
    h uses the value of its KV head (GQA: h // g).
    """
    dt = compute_dtype(y)
    yg = grouped(y.to(dt), v.shape[2])          # [B, T, Hkv, g, d]
    vf = v.to(dt).unsqueeze(3)                  # [B, T, Hkv, 1, d]
    coef = (yg * vf).sum(-1, keepdim=True) / (vf.pow(2).sum(-1, keepdim=True) + eps)
    return (yg - coef * vf).flatten(2, 3).to(y.dtype)


def directional_suppress(o: torch.Tensor, directions: torch.Tensor,
                         route: torch.Tensor) -> torch.Tensor:
    """Directional routing (arXiv 2603.14923, our reading): per head,
    ``o' = o - sum_k r_k <o, u_k> u_k`` with unit directions ``u = U / ||U||``.

    ``o [B, T, H, d]``; ``directions U [H, K, d]``; ``route r [B, T, H, K]`` in (0, 1).
    """
    dt = compute_dtype(o)
    of = o.to(dt)
    u = F.normalize(directions.to(dt), dim=-1)                   # [H, K, d]
    coef = torch.einsum("bthd,hkd->bthk", of, u) * route.to(dt)  # [B, T, H, K]
    return (of - torch.einsum("bthk,hkd->bthd", coef, u)).to(o.dtype)
