"""Multi-scale retention (RetNet, arXiv 2307.08621) token mixer: fla's layer, meta-device friendly, with a torch path.

Parameter names and shapes are those of ``fla.layers.MultiScaleRetention(hidden_size=dim, expand_k=H*K/dim,
expand_v=H*V/dim, num_heads=H)`` with fla 0.6.0's defaults otherwise (no short conv, swish output gate fused
with the RMSNorm, no feature map), so state dicts load either way. Sizes come from the Gated DeltaNet fields
(gdn_num_heads, gdn_head_dim, gdn_expand_v), so a T layer holds the same state as a D or G layer.

Math (fla/layers/multiscale_retention.py, training path):
    q, k = RoPE(x W_q), RoPE(x W_k)   (rotate-half, base 10000, over the whole head: fla's RotaryEmbedding;
                                      no xPos scaling, as fla)
    v = x W_v;  gamma_h = 1 - 2^(-5 - h) for head h = 0..H-1   (fixed, data-independent decay)
    S_t = gamma_h S_{t-1} + k_t v_t^T,   o_t = K^-0.5 S_t^T q_t
    y = W_o( RMSNorm(o) * g_norm_swish_gate.weight * SiLU(x W_g) )   (per head over V)
The paper's GroupNorm over each head is fla's RMSNorm here; its swish gate is the same. Our reading of the
paper's gamma formula, fla's and the authors' (torchscale) all agree: gammas depend only on the head count.

Decode state (``new_state`` / ``step``): ``RetNetState.state`` S [B, H, K, V] in the compute dtype (fp32, fp64
kept; zeros = the training forward's zero initial state) and ``position`` [1] int64, the number of tokens seen:
the layer's own RoPE (base 10000 over K, not the model's table) needs absolute positions, and a counter kept on
the device lets the T = 1 step build its rotation without the caller's position or a host sync. A step is the
one-token recurrence (T = 1) or the chunked torch reference with S as initial state (prefill); fla's
fused_recurrent_retention (T = 1) / chunk_retention (prefill) with S as initial_state on CUDA with kernels "fla" or
"auto" (common.pick_fla) or backend "fla"; kernels "torch" keeps the torch path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neollm.kernels.linear_attention import chunk_simple_gla_ref, gla_decode
from neollm.model.mixers.common import ensure_fla_workaround
from neollm.model.mixers.common import check_decode_kernels, state_dtype, use_fla_step
from neollm.model.mixers.common import linear_attention_recurrence_flops, resolve_backend
from neollm.model.mixers.gated_heads import GatedHeadsMixer
from neollm.model.rope import apply_rope, rope_cache

__all__ = ["MultiScaleRetention", "RetNetState", "retention_log_decays", "retnet_flops_per_token"]

ROPE_BASE = 10_000.0  # fla's RotaryEmbedding default


def retention_log_decays(num_heads: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """log gamma_h = log(1 - 2^(-5 - h)), h = 0..H-1 (as fla.ops.retention.chunk_retention builds them)."""
    h = torch.arange(num_heads, device=device, dtype=dtype)
    return torch.log1p(-torch.pow(2.0, -5.0 - h))


def _rope_rows(head_dim: int, positions: Tensor) -> Tensor:
    """rope_cache(head_dim, ., ROPE_BASE)'s rows at ``positions`` [T] (a device tensor), the same fp32 ops."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                    / head_dim))
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


@dataclass
class RetNetState:
    """A retention layer's decode state: S [B, H, K, V] (compute dtype) and the tokens seen so far, ``position``
    [1] int64 (for the layer's RoPE); both written in place by ``step``."""

    state: Tensor
    position: Tensor
    kernels: str = "auto"

    def tensors(self) -> list[Tensor]:
        return [self.state, self.position]


class MultiScaleRetention(GatedHeadsMixer):
    """RetNet retention mixer, [B, T, D] -> [B, T, D]; backend "fla" (chunk_retention), "torch", or "auto"."""

    chunk_size: int = 64  # torch path; fla's kernel uses 64 too

    def __init__(self, dim: int, num_heads: int, head_k_dim: int, head_v_dim: int, norm_eps: float = 1e-5,
                 backend: str = "auto", layer_idx: int | None = None) -> None:
        if head_k_dim % 2:
            raise ValueError(f"MultiScaleRetention: head_k_dim must be even for RoPE, got {head_k_dim}")
        super().__init__(dim, num_heads, head_k_dim, head_v_dim, norm_eps, backend, layer_idx)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_std: float = 0.02, out_std: float | None = None) -> None:
        """Linear weights ~ N(0, init_std), o_proj ~ N(0, out_std or init_std), norm weight 1 (no other params)."""
        self._init_gated_heads(init_std, out_std)

    def forward(self, x: Tensor) -> Tensor:
        backend = resolve_backend(self.backend, x, "MultiScaleRetention")
        B, T, _ = x.shape
        H, V = self.num_heads, self.head_v_dim
        q, k, v, gate = self._qkvg(x, rope_cache(self.head_k_dim, T, ROPE_BASE, device=x.device))
        if backend == "fla":
            o = _fla_retention(q, k, v, gate, self.g_norm_swish_gate.weight, self.norm_eps)
        else:
            g = retention_log_decays(H, device=x.device).expand(B, T, H)
            o, _ = chunk_simple_gla_ref(q, k, v, g, chunk_size=self.chunk_size)
            o = self.g_norm_swish_gate(o, gate)
        return self.o_proj(o.reshape(B, T, H * V))

    def _qkvg(self, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k (rotated by ``rope``'s first T rows), v and the output gate, per head."""
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q = apply_rope(self.q_proj(x).reshape(B, T, H, K), rope)
        k = apply_rope(self.k_proj(x).reshape(B, T, H, K), rope)
        return q, k, self.v_proj(x).reshape(B, T, H, V), self.g_proj(x).reshape(B, T, H, V)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device, kernels: str = "auto"
                  ) -> RetNetState:
        """Zero decode state for ``batch`` sequences (max_len unused: the state does not grow)."""
        check_decode_kernels(kernels, device, "MultiScaleRetention")
        return RetNetState(
            torch.zeros(batch, self.num_heads, self.head_k_dim, self.head_v_dim, dtype=state_dtype(dtype),
                        device=device),
            torch.zeros(1, dtype=torch.int64, device=device), kernels)

    def step(self, x: Tensor, state: RetNetState, pos=None, rope: Tensor | None = None) -> Tensor:
        """x [B, T, D] of the next T tokens -> [B, T, D], the full forward's rows there; state updated in place.
        pos and rope (the model's table) are unused: RoPE positions come from ``state.position``."""
        B, T, _ = x.shape
        H, V = self.num_heads, self.head_v_dim
        positions = state.position + torch.arange(T, device=x.device)
        q, k, v, gate = self._qkvg(x, _rope_rows(self.head_k_dim, positions))
        state.position.add_(T)
        if use_fla_step(self.backend, state.kernels, x, "MultiScaleRetention"):
            o = _fla_retention_decode(q, k, v, state.state)
        else:
            g = retention_log_decays(H, device=x.device).expand(B, T, H)
            o = gla_decode(q, k, v, g, state.state, chunk_size=self.chunk_size)
        return self.o_proj(self.g_norm_swish_gate(o, gate).reshape(B, T, H * V))


@torch.compiler.disable
def _fla_retention(q: Tensor, k: Tensor, v: Tensor, gate: Tensor, norm_weight: Tensor, eps: float) -> Tensor:
    """fla's Triton chunk_retention (chunk_simple_gla with the fixed gammas) and gated RMSNorm, out of the graph."""
    from fla.modules.norm.fused_norm_gate import rms_norm_gated
    from fla.ops.retention import chunk_retention

    ensure_fla_workaround()
    o, _ = chunk_retention(q=q, k=k, v=v, initial_state=None, output_final_state=False)
    return rms_norm_gated(x=o, g=gate, weight=norm_weight, bias=None, activation="swish", eps=eps)


@torch.compiler.disable
def _fla_retention_decode(q: Tensor, k: Tensor, v: Tensor, state: Tensor) -> Tensor:
    """fla's fused_recurrent_retention (T = 1) or chunk_retention (prefill) from ``state`` [B, H, K, V],
    updated in place."""
    from fla.ops.retention import chunk_retention, fused_recurrent_retention

    ensure_fla_workaround()
    fn = fused_recurrent_retention if q.shape[1] == 1 else chunk_retention
    o, final = fn(q=q, k=k, v=v, initial_state=state, output_final_state=True)
    state.copy_(final)
    return o


def retnet_flops_per_token(dim: int, num_heads: int, head_k_dim: int, head_v_dim: int, chunk_size: int = 64) -> int:
    """Training (fwd + bwd) FLOPs per token of one retention layer, neollm.model.flops's convention.
      projections: 6 (D (2HK + 2HV) + HV D)     [q, k, v, g, o_proj]
      recurrence:  3 H (2C(K + V) + 4KV)        (common.linear_attention_recurrence_flops), C = 64
    RoPE, the decay and the gated norm are elementwise (not counted).
    At D=512, H=4, K=64, V=128: ~6.3M (projections) + ~0.7M (recurrence).
    """
    H, K, V = num_heads, head_k_dim, head_v_dim
    linear = dim * (2 * H * K + 2 * H * V) + H * V * dim
    return 6 * linear + linear_attention_recurrence_flops(H, K, V, chunk_size)

