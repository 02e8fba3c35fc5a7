"""Functional pieces of NeoLLM's full attention (see ``neollm/model/attention.py`` for the order,
the papers and the interpretations). The epilogue (XSA, routing, gate) lives with its kernels in
neollm/kernels/attention_epilogue.py.

Shapes: per-head tensors are ``[B, T, heads, d]`` (the projection layout) unless a function says
otherwise. Every normalisation / reduction runs in ``compute_dtype(x)`` (fp32, or fp64 when the
input is fp64) and the result is cast back to the input's dtype. None of these functions branch
on tensor values, so they trace into one graph under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from neollm.kernels import lucid as lucid_kernels
from neollm.kernels.triton_support import KERNEL_IMPLS, resolve_impl
from neollm.precision import compute_dtype


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
    # A matvec (under autocast a bf16 one, fp32 accumulate): its backward's <x, grad> reduction over
    # all tokens is one cuBLAS GEMV. Written as multiply + sum, inductor's fused column reduction for
    # beta's gradient was a large share of a step (BENCHMARKS.md, fifth session, "Fix 1").
    s = torch.tanh(xf @ beta.to(dt)).unsqueeze(-1)  # [..., 1]
    scale = s * alpha.to(dt) + gamma.to(dt)
    return (scale * rms_normalize(xf, eps)).to(x.dtype)


def mix_heads(x: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    """Head-level linear composition: ``out[..., j, :] = sum_i mixing[j, i] * x[..., i, :]``.

    ``x [B, T, Hkv, d]``, ``mixing [Hkv, Hkv]``. Written as Hkv multiply-adds in the compute dtype, not
    an einsum: the einsum became a GEMM with an inner size of Hkv (4), which cuBLAS runs on slow
    unaligned kernels (its backward reduces over all B*T*d rows), and autocast ran it in bf16. The
    multiply-adds fuse with the GroupNorm that follows; the result is contiguous (SDPA's fused
    kernels need the head dim dense) and in x's dtype.
    """
    dt = compute_dtype(x)
    xf, m = x.to(dt), mixing.to(dt)
    out = xf[:, :, :1] * m[:, 0].view(1, 1, -1, 1)
    for i in range(1, x.shape[2]):
        out = out + xf[:, :, i:i + 1] * m[:, i].view(1, 1, -1, 1)
    return out.to(x.dtype).contiguous()


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


def momentum_shift(x: torch.Tensor, gamma: float, first: str = "repeat") -> torch.Tensor:
    """Momentum (arXiv 2602.04902): ``x_t + gamma * (x_t - x_{t-1})`` along dim 1. Causal (uses only t-1).

    ``first`` sets ``x_{-1}``: "repeat" ``x_0`` (first velocity 0) or "zero" (the NeoLLM author's kernel,
    ``F.pad`` with a zero row: ``x_0 -> (1 + gamma) x_0``)."""
    head = torch.zeros_like(x[:, :1]) if first == "zero" else x[:, :1]
    previous = torch.cat([head, x[:, :-1]], dim=1)
    return x + gamma * (x - previous)


def lucid_preconditioner(k: torch.Tensor, eps: float) -> torch.Tensor:
    """LUCID's ``P = tril(exp(K_rn K_rn^T / sqrt(d) - sqrt(d)))``, ``k [B, Hkv, T, d]`` ->
    ``[B, Hkv, T, T]`` in the compute dtype (what the reference solve forms; the kernels never do).

    Keys are RMS-normalised (no gain), so ``||k_rn||^2 = d * ms / (ms + eps) <= d``: the exponent
    is 0 (up to eps) on the diagonal and, by Cauchy-Schwarz, <= 0 everywhere: every entry lies in
    ``(0, 1]``, nothing can overflow. The solve treats the diagonal as exactly 1.
    """
    # The Gram matrix in fp32 even under autocast: there it would be a bf16 GEMM whose output,
    # rounded near d (64), moves the exponent by up to ~0.03; with correlated keys (entries of P
    # near 1) that put X = P^-1 V 10% off the fp64 solution, against 1e-5 in fp32
    # (tools/bench_attention.py, BENCHMARKS.md).
    with torch.autocast(k.device.type, enabled=False):
        return lucid_kernels.preconditioner(rms_normalize(k, eps))


LUCID_IMPLS = KERNEL_IMPLS
LUCID_IMPL = os.environ.get("NEOLLM_LUCID_IMPL", "auto")
"""Which implementation ``lucid_values`` runs when not told: "triton" (the fused kernels of
neollm/kernels/lucid.py: CUDA, fp32/bf16/fp16), "torch" (the same op with the PyTorch reference:
P formed in HBM, cuBLAS triangular solves) or "auto" (the default: triton where it can run, else
torch). With tf32x3 products (lucid.DOT_PRECISION) the four technique kernels together ran
neollm_135m's real trainer 1.18x faster than the references (H100, BENCHMARKS.md 2026-12-05); with
IEEE products LUCID's kernels alone were 0.92x. Set here, or for a whole run (trainer, tools/bench.py) by the environment variable
NEOLLM_LUCID_IMPL; an unknown name is an error at the first LUCID call."""


def lucid_uses_kernel(impl: str, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Resolve ``impl`` (one of LUCID_IMPLS) for these keys / values: True for the Triton kernels."""
    reason = lucid_kernels.kernel_unavailable_reason(k.device, (compute_dtype(k), v.dtype), k.shape[-1])
    return resolve_impl(impl, reason, k.is_cuda, "lucid_impl (attention_ops.LUCID_IMPL, env NEOLLM_LUCID_IMPL)",
                        "lucid_impl")


def lucid_values(k: torch.Tensor, v: torch.Tensor, eps: float, impl: str | None = None) -> torch.Tensor:
    """LUCID (arXiv 2602.10410): ``X = P^{-1} V`` per KV head; ``k, v [B, Hkv, T, d]``; returns
    X contiguous in v's dtype.

    The keys' RMS normalisation runs here (autograd); the solve is the custom op
    ``neollm::lucid_solve`` (one node under torch.compile), computed in the compute dtype (fp32
    on bf16 runs). For backward the op keeps only X and the normalised keys and rebuilds P's
    tiles from the keys (the kernels) or P itself (the reference): no [B, Hkv, T, T] tensor
    outlives forward (it would be 268 MB per layer at 64 x 512 tokens with 4 KV heads, fp32).
    ``impl``: one of LUCID_IMPLS, default the module's ``LUCID_IMPL``.
    """
    use_kernel = lucid_uses_kernel(LUCID_IMPL if impl is None else impl, k, v)
    with torch.autocast(k.device.type, enabled=False):
        x = lucid_kernels.lucid_solve(rms_normalize(k, eps), v, use_kernel)
    return x.to(v.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal SDPA over ``[B, heads, T, d]`` tensors (GQA when k/v have fewer heads).

    PyTorch picks the backend (and honours ``torch.nn.attention.sdpa_kernel`` / ``torch.backends``
    settings around the call). Putting cuDNN first, as torchtitan does, was measured: faster alone
    in one call, not in another, and no change in a whole `plain` step (BENCHMARKS.md, fifth
    session). Not worth overriding the user's settings or PyTorch's per-architecture choice for."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                          enable_gqa=k.shape[1] != q.shape[1])


def causal_mean(v: torch.Tensor) -> torch.Tensor:
    """``mean_{j <= i} v_j`` along dim 2 of ``v [B, Hkv, T, d]`` (a cumsum, no T x T matrix)."""
    dt = compute_dtype(v)
    seq_len = v.shape[2]
    count = torch.arange(1, seq_len + 1, device=v.device, dtype=dt).view(1, 1, seq_len, 1)
    return (torch.cumsum(v.to(dt), dim=2) / count).to(v.dtype)
