"""Pure-PyTorch chunked gated linear attention: the CPU path of the GLA, RetNet and Mamba2 mixers.

Why: fla's ``chunk_gla`` / ``chunk_simple_gla`` are Triton (CUDA only). These are the CPU training path and
the ground truth the GPU kernels are tested against; plain autograd differentiates them.

Layout (as fla): q, k [B, T, H, K]; v [B, T, H, V]; state [B, H, K, V]. Per head, with log decays <= 0,
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t
``chunk_gla_ref`` takes g [B, T, H, K] (one decay per key channel, GLA, arXiv 2312.06635);
``chunk_simple_gla_ref`` takes g [B, T, H] (one decay per head: RetNet's fixed gamma, Mamba2's exp(dt A)).

Chunked form (chunk of C tokens, G = cumulative sum of g inside the chunk, S the state before the chunk):
    o_i = scale * [ sum_{j<=i in chunk} (q_i * exp(G_i - G_j)) . k_j v_j  +  (q_i * exp(G_i))^T S ]
    S  <- exp(G_C) * S + sum_j (k_j * exp(G_C - G_j)) v_j^T
Every exponent is <= 0 (masked to -inf above the diagonal before exp), so nothing overflows in any
dtype. The per-channel form builds a [C, C, K] decay tensor per chunk (exact; fla instead splits into
sub-chunks), so its chunk is small. Math is in fp32 (fp64 if an input is fp64), autocast off inside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neollm.precision import compute_dtype

__all__ = ["chunk_gla_ref", "chunk_simple_gla_ref", "recurrent_gla_step", "gla_decode"]


def _chunks(x: Tensor, chunk: int, dtype: torch.dtype) -> Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...] zero-padded to N*C tokens (padding comes after: causal-safe)."""
    T = x.shape[1]
    pad = (-T) % chunk
    x = x.to(dtype).movedim(2, 1)  # [B, H, T, ...]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(*x.shape[:2], -1, chunk, *x.shape[3:])


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor, g_dims: int) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] matching q {tuple(q.shape)}; got {tuple(v.shape)}")
    if g.shape != q.shape[:g_dims]:
        raise ValueError(f"g must have shape {tuple(q.shape[:g_dims])}; got {tuple(g.shape)}")


def _run(q: Tensor, k: Tensor, v: Tensor, g: Tensor, per_channel: bool, scale: float | None, chunk_size: int,
         initial_state: Tensor | None, output_final_state: bool) -> tuple[Tensor, Tensor | None]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = compute_dtype(q, k, v, g, initial_state)
    C = chunk_size
    with torch.autocast(device_type=q.device.type, enabled=False):
        qc, kc, vc, gc = (_chunks(t, C, dtype) for t in (q, k, v, g))  # g: [B,H,N,C(,K)]
        G = gc.cumsum(3)
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        if per_channel:
            diff = G[..., :, None, :] - G[..., None, :, :]  # [B,H,N,C,C,K]: G_i - G_j
            diff = diff.masked_fill(~causal[..., None], float("-inf"))
            scores = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qc, kc, diff.exp())
            q_in, G_last = qc * G.exp(), G[:, :, :, -1:]  # [B,H,N,1,K]
            k_out = kc * (G_last - G).exp()
        else:
            diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))
            scores = (qc @ kc.transpose(-1, -2)) * diff.exp()
            G_last = G[:, :, :, -1:]  # [B,H,N,1]
            q_in = qc * G.exp()[..., None]
            k_out = kc * (G_last - G).exp()[..., None]
        o_intra = scores @ vc  # [B,H,N,C,V]
        S = (initial_state.to(dtype) if initial_state is not None
             else q.new_zeros(B, H, K, V, dtype=dtype))
        outs = []
        for n in range(qc.shape[2]):
            outs.append(q_in[:, :, n] @ S)
            decay = G_last[:, :, n].exp()  # [B,H,1,K] or [B,H,1]
            decay = decay.transpose(-1, -2) if per_channel else decay[..., None]
            S = decay * S + k_out[:, :, n].transpose(-1, -2) @ vc[:, :, n]
        o = (o_intra + torch.stack(outs, dim=2)) * scale
        o = o.reshape(B, H, -1, V)[:, :, :T].movedim(1, 2)
    return o.to(v.dtype), (S if output_final_state else None)


def chunk_gla_ref(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None, chunk_size: int = 16,
                  initial_state: Tensor | None = None, output_final_state: bool = False
                  ) -> tuple[Tensor, Tensor | None]:
    """GLA with per-key-channel log decay g [B, T, H, K]; returns (o [B, T, H, V] in v's dtype, final state)."""
    _check(q, k, v, g, 4)
    return _run(q, k, v, g, True, scale, chunk_size, initial_state, output_final_state)


def chunk_simple_gla_ref(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None,
                         chunk_size: int = 64, initial_state: Tensor | None = None,
                         output_final_state: bool = False) -> tuple[Tensor, Tensor | None]:
    """Linear attention with one log decay per head and token, g [B, T, H]; as ``chunk_gla_ref`` otherwise."""
    _check(q, k, v, g, 3)
    return _run(q, k, v, g, False, scale, chunk_size, initial_state, output_final_state)


def recurrent_gla_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float | None = None) -> Tensor:
    """One token of the recurrence, written into ``state`` [B, H, K, V] in place; returns o [B, 1, H, V] in v's dtype.

    q, k [B, 1, H, K], v [B, 1, H, V], g [B, 1, H, K] (per channel) or [B, 1, H] (per head). Elementwise
    products and sums instead of tiny batched matmuls (cheap, and no data-dependent branch: CUDA-graph safe).
    """
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = state.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        q1, k1, v1, g1 = (t[:, 0].to(dtype) for t in (q, k, v, g))  # [B, H, *]
        decay = g1.exp()[..., None] if g1.dim() == 3 else g1.exp()[..., None, None]
        S = decay * state + k1[..., None] * v1[..., None, :]
        state.copy_(S)
        o = (q1[..., None] * S).sum(-2) * scale
    return o[:, None].to(v.dtype)


def gla_decode(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float | None = None,
               chunk_size: int = 16) -> Tensor:
    """T new tokens continuing from ``state`` (updated in place): the one-token recurrence for T = 1 (the
    decode step), the chunked reference with the state as initial state for a prefill (T > 1). g's rank picks
    per-channel (GLA) or per-head (RetNet, Mamba2) decay."""
    if q.shape[1] == 1:
        return recurrent_gla_step(q, k, v, g, state, scale)
    fn = chunk_gla_ref if g.dim() == 4 else chunk_simple_gla_ref
    o, S = fn(q, k, v, g, scale=scale, chunk_size=chunk_size, initial_state=state, output_final_state=True)
    state.copy_(S)
    return o
