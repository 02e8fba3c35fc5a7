"""Pure-PyTorch gated delta rule (Gated DeltaNet core), written for NeoLLM.

Why: fla's kernels are Triton (CUDA only). These references are the CPU training path and the ground
truth the GPU kernels are tested against. Both are differentiable with plain autograd.

Layout (as fla): q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; state [B, H, K, V].
Per head, with g_t <= 0 the log decay:
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale * q_t)
(arXiv 2412.06464, eq. for the gated delta rule; fla/ops/gated_delta_rule/naive.py uses the same convention).

Math is done in fp32 (fp64 when any input is fp64, so the tests can compare to 1e-8), with autocast
switched off inside so torch.autocast(bf16) in the caller cannot lower it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neollm.precision import compute_dtype

__all__ = ["chunk_gated_delta_rule_ref", "recurrent_gated_delta_rule"]


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> None:
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(f"q and k must both be [B, T, H, K]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3] or g.shape != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] and g, beta [B, T, H] matching q {tuple(q.shape)}; "
            f"got v {tuple(v.shape)}, g {tuple(g.shape)}, beta {tuple(beta.shape)}"
        )


def recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token gated delta rule: the ground truth (O(T) sequential steps, slow; tests only).

    Written as decay -> delta write, which is the recurrence above rearranged:
    S' = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S'^T k_t);  S_t = S' + k_t u_t^T.
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] in the compute dtype, or None).
    """
    _check_shapes(q, k, v, g, beta)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qh, kh, vh = (x.transpose(1, 2).to(dt) for x in (q, k, v))  # [B, H, T, *]
        gh, bh = (x.transpose(1, 2).to(dt) for x in (g, beta))  # [B, H, T]
        qh = qh * scale
        if initial_state is None:
            S = torch.zeros(B, H, K, V, dtype=dt, device=q.device)
        else:
            S = initial_state.to(dt)
        outs = []
        for t in range(T):
            S = S * gh[:, :, t].exp()[..., None, None]
            k_t = kh[:, :, t]
            u_t = bh[:, :, t, None] * (vh[:, :, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))
            S = S + k_t[..., :, None] * u_t[..., None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", qh[:, :, t], S))
        o = torch.stack(outs, dim=2) if outs else vh.new_zeros(B, H, 0, V)
    return o.transpose(1, 2).to(v.dtype), (S if output_final_state else None)


def chunk_gated_delta_rule_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Chunked (WY / UT-transform) gated delta rule: same result as the recurrence, matmul-shaped.

    Why: this is what fla's chunk kernel computes, and on CPU it is far faster than the token loop
    (one Python step per chunk, everything inside a chunk batched over all chunks at once).

    Per chunk of C tokens, state S entering it, gamma = cumsum(g) inside the chunk, Gamma = exp(gamma):
      A = strict_tril(diag(beta) (K K^T * exp(gamma_i - gamma_j)))
      Tm = (I + A)^-1                                  (unit lower-triangular solve)
      W = Tm diag(beta) (K * Gamma),  U = Tm diag(beta) V
      V_new = U - W S                                  (the delta-rule pseudo-values u_t)
      O = (Q * Gamma) S + tril(Q K^T * exp(gamma_i - gamma_j)) V_new   (diagonal included)
      S <- exp(gamma_C) S + (K * exp(gamma_C - gamma))^T V_new
    Derivation: u_t = beta_t (v_t - (decayed S_{t-1})^T k_t); unrolling S_{t-1} inside the chunk gives
    (I + A) U_all = diag(beta) V - diag(beta Gamma) K S, hence the above.
    Checked against techniques.md §16.5, fla's naive_chunk_gated_delta_rule (fla/ops/gated_delta_rule/naive.py)
    and the paper: §16.5 is correct as written. One detail the spec leaves implicit: the decay exponents
    gamma_i - gamma_j are masked to -inf above the diagonal BEFORE exp (they are positive there and can
    overflow to inf, and inf * 0 = nan).
    T need not be a multiple of chunk_size: the tail is zero-padded (k = 0, beta = 0, g = 0 makes a
    padded step the identity on S, so outputs and the final state are unaffected).
    """
    _check_shapes(q, k, v, g, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    pad = (-T) % C
    N = (T + pad) // C
    with torch.autocast(device_type=q.device.type, enabled=False):
        qh, kh, vh = (F.pad(x.transpose(1, 2).to(dt), (0, 0, 0, pad)) for x in (q, k, v))  # [B, H, T+pad, *]
        gh, bh = (F.pad(x.transpose(1, 2).to(dt), (0, pad)) for x in (g, beta))  # [B, H, T+pad]
        qh = (qh * scale).reshape(B, H, N, C, K)
        kh = kh.reshape(B, H, N, C, K)
        vh = vh.reshape(B, H, N, C, V)
        bh = bh.reshape(B, H, N, C)
        gam = gh.reshape(B, H, N, C).cumsum(-1)  # gamma, within-chunk cumulative log decay

        idx = torch.arange(C, device=q.device)
        causal = idx[:, None] >= idx[None, :]  # i >= j
        diff = gam[..., :, None] - gam[..., None, :]  # gamma_i - gamma_j
        decay = diff.masked_fill(~causal, float("-inf")).exp()  # exp(gamma_i - gamma_j), 0 above diagonal

        kkt = kh @ kh.transpose(-1, -2)
        strict = idx[:, None] > idx[None, :]
        A = (bh[..., :, None] * kkt * decay).masked_fill(~strict, 0.0)
        eye = torch.eye(C, dtype=dt, device=q.device)
        rhs = torch.cat([bh[..., None] * vh, bh[..., None] * kh * gam.exp()[..., None]], dim=-1)
        sol = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        U, W = sol.split([V, K], dim=-1)

        qk = (qh @ kh.transpose(-1, -2)) * decay  # includes the diagonal
        q_dec = qh * gam.exp()[..., None]
        k_dec = kh * (gam[..., -1:] - gam).exp()[..., None]
        chunk_decay = gam[..., -1].exp()  # [B, H, N]

        if initial_state is None:
            S = torch.zeros(B, H, K, V, dtype=dt, device=q.device)
        else:
            S = initial_state.to(dt)
        outs = []
        for n in range(N):
            v_new = U[:, :, n] - W[:, :, n] @ S
            outs.append(q_dec[:, :, n] @ S + qk[:, :, n] @ v_new)
            S = S * chunk_decay[:, :, n, None, None] + k_dec[:, :, n].transpose(-1, -2) @ v_new
        if outs:
            o = torch.stack(outs, dim=2).reshape(B, H, N * C, V)[:, :, :T]
        else:
            o = vh.new_zeros(B, H, 0, V)
    return o.transpose(1, 2).to(v.dtype), (S if output_final_state else None)
