"""Pure-PyTorch RWKV-6 time-mixing recurrence (the "wkv" of Finch, arXiv 2404.05892), written for NeoLLM.

Why: fla's ``chunk_rwkv6`` is Triton (CUDA only). This chunked form is the CPU training path and the
reference the GPU kernel is tested against; it is differentiable with plain autograd.

Layout (as fla): r, k, w [B, T, H, K]; v [B, T, H, V]; u (the "bonus") [H, K]; state [B, H, K, V].
Per head, with w_t <= 0 the per-channel log decay (fla's convention: the layer passes -exp(.)):
    o_t = (scale r_t)^T (S_{t-1} + diag(u) k_t v_t^T)
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T
(fla/ops/rwkv6/recurrent_naive.py computes the same; there r is called q.)

Chunked evaluation, chunk length C, inclusive log-decay cumsum c_i and exclusive e_i = c_i - w_i inside a
chunk: inter-chunk o_i += (r_i * exp(e_i)) S_start, intra-chunk A_ij = sum_k r_ik k_jk exp(e_ik - c_jk) for
j < i and A_ii = sum_k r_ik u_k k_ik. Every exponent is a sum of log decays (<= 0), and the j >= i ones are
masked to -inf *before* exp, so strong decays cannot overflow into inf * 0. Math is fp32 (fp64 when any
input is fp64), autocast off inside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neollm.precision import compute_dtype

__all__ = ["chunk_rwkv6_ref", "recurrent_rwkv6_step", "rwkv6_decode"]


def chunk_rwkv6_ref(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor | None]:
    """RWKV-6 wkv over [B, T, H, *] inputs; returns (o [B, T, H, V] in v's dtype, final state or None).

    Memory is O(B H T C K) for the pairwise intra-chunk decays, so keep ``chunk_size`` small (16).
    """
    if r.dim() != 4 or r.shape != k.shape or r.shape != w.shape:
        raise ValueError(f"r, k, w must all be [B, T, H, K]; got {tuple(r.shape)}, {tuple(k.shape)}, {tuple(w.shape)}")
    if v.dim() != 4 or v.shape[:3] != r.shape[:3] or u.shape != r.shape[2:]:
        raise ValueError(f"v must be [B, T, H, V] and u [H, K] matching r {tuple(r.shape)}; "
                         f"got v {tuple(v.shape)}, u {tuple(u.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, H, K = r.shape
    V = v.shape[-1]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    dt = compute_dtype(r, k, v, w, u, initial_state)
    with torch.autocast(device_type=r.device.type, enabled=False):
        # [B, H, N, C, *]; padded steps (zero k, v, w) come after every real one, so they change nothing.
        rc, kc, vc, wc = (
            F.pad(x.to(dt), (0, 0, 0, 0, 0, pad)).transpose(1, 2).reshape(B, H, N, C, -1) for x in (r, k, v, w)
        )
        rc = rc * scale
        cum = wc.cumsum(-2)  # inclusive
        exc = cum - wc  # exclusive
        last = cum[..., -1:, :]  # [B, H, N, 1, K] total log decay of each chunk

        # intra-chunk scores
        expo = exc.unsqueeze(-2) - cum.unsqueeze(-3)  # [B, H, N, C(i), C(j), K]
        strict = torch.ones(C, C, dtype=torch.bool, device=r.device).tril(-1)
        expo = expo.masked_fill(~strict[:, :, None], float("-inf"))
        A = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", rc, kc, expo.exp())
        diag = (rc * u.to(dt)[None, :, None, None, :] * kc).sum(-1)  # [B, H, N, C]
        A = A + torch.diag_embed(diag)
        o = A @ vc  # [B, H, N, C, V]

        # inter-chunk: state entering each chunk
        k_to_end = kc * (last - cum).exp()  # decay from step j to the chunk end
        contrib = k_to_end.transpose(-1, -2) @ vc  # [B, H, N, K, V]
        S = initial_state.to(dt) if initial_state is not None else r.new_zeros(B, H, K, V, dtype=dt)
        starts = []
        for n in range(N):
            starts.append(S)
            S = S * last[:, :, n, 0, :, None].exp() + contrib[:, :, n]
        S_start = torch.stack(starts, dim=2)  # [B, H, N, K, V]
        o = o + (rc * exc.exp()) @ S_start

    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2).to(v.dtype)
    return o, (S if output_final_state else None)


def recurrent_rwkv6_step(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor,
                         scale: float = 1.0) -> Tensor:
    """One token of the wkv recurrence, ``state`` [B, H, K, V] updated in place; returns o [B, 1, H, V] in v's dtype:
    o = (scale r)^T (S + diag(u) k v^T),  S <- diag(exp(w)) S + k v^T. Elementwise, no data-dependent branch."""
    dtype = state.dtype
    with torch.autocast(device_type=r.device.type, enabled=False):
        r1, k1, v1, w1 = (t[:, 0].to(dtype) for t in (r, k, v, w))  # [B, H, *]
        kv = k1[..., None] * v1[..., None, :]  # [B, H, K, V]
        o = ((r1 * scale)[..., None] * (state + u.to(dtype)[..., None] * kv)).sum(-2)
        state.copy_(w1.exp()[..., None] * state + kv)
    return o[:, None].to(v.dtype)


def rwkv6_decode(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor, scale: float = 1.0,
                 chunk_size: int = 16) -> Tensor:
    """T new tokens continuing from ``state`` (updated in place): the one-token recurrence for T = 1, the chunked
    reference with the state as initial state for a prefill (T > 1)."""
    if r.shape[1] == 1:
        return recurrent_rwkv6_step(r, k, v, w, u, state, scale)
    o, S = chunk_rwkv6_ref(r, k, v, w, u, scale=scale, initial_state=state, output_final_state=True,
                           chunk_size=chunk_size)
    state.copy_(S)
    return o
