"""Gated Linear Attention (GLA, arXiv 2312.06635) token mixer: fla's layer, meta-device friendly, with a torch path.

Parameter names and shapes are those of ``fla.layers.GatedLinearAttention(hidden_size=dim, expand_k=H*K/dim,
expand_v=H*V/dim, num_heads=H, gate_low_rank_dim=r)`` with fla 0.6.0's defaults otherwise (mode 'chunk', no
short conv, swish output gate fused with the RMSNorm, gate_logit_normalizer 16, no clamp, no feature map),
so state dicts load either way. Sizes come from the Gated DeltaNet fields (gdn_num_heads, gdn_head_dim,
gdn_expand_v): at dim 512 they give fla's default shape (K = dim/2 over 4 heads, V = dim), and GLA and
GDN layers then carry the same recurrent state.

Math (fla/layers/gla.py, training path, no cache / mask):
    q, k, v = x W_q, x W_k, x W_v;   g = logsigmoid(x W_gk1 W_gk2 + b_gk) / 16   (per key channel, <= 0)
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = K^-0.5 S_t^T q_t
    y = W_o( RMSNorm(o) * g_norm_swish_gate.weight * SiLU(x W_g) )   (per head over V)

Decode state (``new_state`` / ``step``, for cached generation): ``GLAState.state`` S [B, H, K, V] in the
compute dtype (fp32, fp64 kept), zeros at the start = the training forward's zero initial state. A step of T
tokens is the one-token recurrence (T = 1) or the chunked torch reference with S as initial state (prefill);
fla's fused_recurrent_gla (T = 1) / chunk_gla (prefill) with the state as initial_state
on CUDA with kernels "fla" or "auto" (common.pick_fla) or backend "fla"; kernels "torch" keeps the
torch path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dataclasses import dataclass

from neollm.kernels.linear_attention import chunk_gla_ref, gla_decode
from neollm.model.mixers.common import ensure_fla_workaround
from neollm.precision import upcast
from neollm.model.mixers.common import check_decode_kernels, state_dtype, use_fla_step
from neollm.model.mixers.common import linear_attention_recurrence_flops, resolve_backend
from neollm.model.mixers.gated_heads import GatedHeadsMixer

__all__ = ["GatedLinearAttention", "GLAState", "gla_flops_per_token"]


@dataclass
class GLAState:
    """A GLA layer's decode state: S [B, H, K, V] (compute dtype), written in place by ``step``."""

    state: Tensor
    kernels: str = "auto"

    def tensors(self) -> list[Tensor]:
        return [self.state]


class GatedLinearAttention(GatedHeadsMixer):
    """GLA token mixer, [B, T, D] -> [B, T, D]; backend "fla" (Triton chunk_gla), "torch", or "auto"."""

    chunk_size: int = 16  # torch path only ([C, C, K] decay tensor per chunk); fla's kernel uses 64
    gate_logit_normalizer: float = 16.0

    def __init__(self, dim: int, num_heads: int, head_k_dim: int, head_v_dim: int, gate_low_rank_dim: int = 16,
                 norm_eps: float = 1e-5, backend: str = "auto", layer_idx: int | None = None) -> None:
        # the low-rank forget gate sits between g_proj and o_proj, as in fla's layer
        gk_proj = nn.Sequential(nn.Linear(dim, gate_low_rank_dim, bias=False),
                                nn.Linear(gate_low_rank_dim, num_heads * head_k_dim, bias=True))
        super().__init__(dim, num_heads, head_k_dim, head_v_dim, norm_eps, backend, layer_idx,
                         gates={"gk_proj": gk_proj})
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_std: float = 0.02, out_std: float | None = None) -> None:
        """Linear weights ~ N(0, init_std), o_proj ~ N(0, out_std or init_std), the gate bias 0 (fla's model
        init: every Linear normal, biases zero), norm weight 1. The gate then starts at logsigmoid(0)/16:
        a decay of exp(-0.043) = 0.958 per token on every channel."""
        self._init_gated_heads(init_std, out_std, self.gk_proj[0], self.gk_proj[1])
        nn.init.zeros_(self.gk_proj[1].bias)

    def _qkvg(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q = self.q_proj(x).reshape(B, T, H, K)
        k = self.k_proj(x).reshape(B, T, H, K)
        v = self.v_proj(x).reshape(B, T, H, V)
        gk = F.logsigmoid(upcast(self.gk_proj(x))) / self.gate_logit_normalizer
        return q, k, v, gk.reshape(B, T, H, K)

    def forward(self, x: Tensor) -> Tensor:
        backend = resolve_backend(self.backend, x, "GatedLinearAttention")
        B, T, _ = x.shape
        H, V = self.num_heads, self.head_v_dim
        q, k, v, gk = self._qkvg(x)
        gate = self.g_proj(x).reshape(B, T, H, V)
        if backend == "fla":
            o = _fla_gla(q, k, v, gk, gate, self.g_norm_swish_gate.weight, self.norm_eps)
        else:
            o, _ = chunk_gla_ref(q, k, v, gk, chunk_size=self.chunk_size)
            o = self.g_norm_swish_gate(o, gate)
        return self.o_proj(o.reshape(B, T, H * V))

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device, kernels: str = "auto") -> GLAState:
        """Zero decode state for ``batch`` sequences (max_len unused: the state does not grow)."""
        check_decode_kernels(kernels, device, "GatedLinearAttention")
        return GLAState(torch.zeros(batch, self.num_heads, self.head_k_dim, self.head_v_dim,
                                    dtype=state_dtype(dtype), device=device), kernels)

    def step(self, x: Tensor, state: GLAState, pos=None, rope: Tensor | None = None) -> Tensor:
        """x [B, T, D] of the next T tokens -> [B, T, D], the full forward's rows there; state updated in place
        (pos and rope unused: the recurrence carries the position)."""
        B, T, _ = x.shape
        H, V = self.num_heads, self.head_v_dim
        q, k, v, gk = self._qkvg(x)
        gate = self.g_proj(x).reshape(B, T, H, V)
        if use_fla_step(self.backend, state.kernels, x, "GatedLinearAttention"):
            o = _fla_gla_decode(q, k, v, gk, state.state)
        else:
            o = gla_decode(q, k, v, gk, state.state, chunk_size=self.chunk_size)
        return self.o_proj(self.g_norm_swish_gate(o, gate).reshape(B, T, H * V))


@torch.compiler.disable
def _fla_gla(q: Tensor, k: Tensor, v: Tensor, gk: Tensor, gate: Tensor, norm_weight: Tensor, eps: float) -> Tensor:
    """fla's Triton chunk_gla and gated RMSNorm, outside torch.compile's graph (as deltanet._fla_mix)."""
    from fla.modules.norm.fused_norm_gate import rms_norm_gated
    from fla.ops.gla import chunk_gla

    ensure_fla_workaround()
    o, _ = chunk_gla(q=q, k=k, v=v, g=gk, initial_state=None, output_final_state=False, state_v_first=True)
    return rms_norm_gated(x=o, g=gate, weight=norm_weight, bias=None, activation="swish", eps=eps)


@torch.compiler.disable
def _fla_gla_decode(q: Tensor, k: Tensor, v: Tensor, gk: Tensor, state: Tensor) -> Tensor:
    """fla's fused_recurrent_gla (T = 1: one launch, no host sync) or chunk_gla (prefill) from ``state``
    [B, H, K, V] (K-first layout), which is updated in place."""
    from fla.ops.gla import chunk_gla, fused_recurrent_gla

    ensure_fla_workaround()
    if q.shape[1] == 1:
        o, final = fused_recurrent_gla(q=q, k=k, v=v, gk=gk, initial_state=state, output_final_state=True)
    else:
        o, final = chunk_gla(q=q, k=k, v=v, g=gk, initial_state=state, output_final_state=True)
    state.copy_(final)
    return o


def gla_flops_per_token(dim: int, num_heads: int, head_k_dim: int, head_v_dim: int, gate_low_rank_dim: int,
                        chunk_size: int = 64) -> int:
    """Training (fwd + bwd) FLOPs per token of one GLA layer, neollm.model.flops's convention (x3 matmuls,
    elementwise work not counted).
      projections: 6 (D (2HK + 2HV) + D r + r HK + HV D)    [q, k, v, g, the low-rank gate (r), o_proj]
      recurrence:  3 H (2C(K + V) + 4KV)                     (linear_attention_recurrence_flops), C = 64
    At D=512, H=4, K=64, V=128, r=16: ~6.4M (projections) + ~0.7M (recurrence).
    """
    H, K, V, r = num_heads, head_k_dim, head_v_dim, gate_low_rank_dim
    linear = dim * (2 * H * K + 2 * H * V) + dim * r + r * H * K + H * V * dim
    return 6 * linear + linear_attention_recurrence_flops(H, K, V, chunk_size)
