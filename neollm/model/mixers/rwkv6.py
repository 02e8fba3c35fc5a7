"""RWKV-6 ("Finch", arXiv 2404.05892) time mixing as a NeoLLM token mixer: fla's RWKV6Attention, meta-friendly.

Why RWKV-6 rather than RWKV-7: seed 003 benchmarked RWKV6 (its best mixer), and RWKV-6 is self-contained per
layer (RWKV-7's value residual ``v_first`` crosses layers, which the Block interface does not carry).

Parameter names and shapes are those of ``fla.layers.RWKV6Attention(hidden_size=dim, num_heads=num_heads,
expand_k=expand_v=num_heads*head_dim/dim, proj_low_rank_dim, gate_low_rank_dim, mode='chunk')`` (fla 0.6.0,
fla/layers/rwkv6.py), so state dicts load either way. Math on the training path (no cache / mask / varlen):

    delta   = shift(x) - x                       shift(x)_t = x_{t-1}, x_{-1} = 0 (token shift)
    m       = tanh((x + delta * mu_x) W_x1)       [B, T, 5, r] low-rank data-dependent lerp (ddlerp)
    mix_*   = m_* W_x2[*] + x_bias[*]             for * in r, w, k, v, g
    r, k, v, g = (x + delta * mix_*) W_*          (DDLerpLinear)
    w       = -exp(LoRA_w(x + delta * mix_w))     LoRA: tanh(. A) B + b   (per-channel log decay <= 0)
    o       = wkv6(r, k, v, w, u = bonus, scale 1)  (neollm.kernels.rwkv6 / fla chunk_rwkv6)
    y       = W_o( GroupNorm_H(o) * SiLU(g) )     per-head LayerNorm with weight and bias

fla's Triton-only pieces are done in torch here: the token shift (a pad), the per-head GroupNorm
(fla.modules.GroupNorm, not RMS), the LoRA. On CUDA only the wkv recurrence goes to fla's kernel.

Initialisation (our reading of fla's ``_initialize_weights`` and ``LoRA``): special parameters follow fla —
mu, x_bias, bonus = 0; LoRA down-projection = 0, up-projection [out, in] orthogonal with gain
0.1 * (sqrt(in/out) if in > out else 1), LoRA bias 0; GroupNorm weight 1, bias 0. So the decay starts at exp(-1) per step on every channel (fla's choice; the official
RWKV-6 uses a per-channel decay schedule instead). The dense projections use NeoLLM's convention
(N(0, init_std), o_proj N(0, out_std)) instead of fla's xavier_uniform(gain 2^-2.5), as the GDN mixer does.

Decode state (``new_state`` / ``step``): ``RWKV6State.wkv`` S [B, H, K, V] in the compute dtype (fp32, fp64
kept; zeros = the training forward's zero initial state) and ``shift`` [B, 1, D], the previous token's input in
the activation dtype (zeros = the token shift's x_{-1} = 0). A step is the one-token wkv recurrence (T = 1) or
the chunked torch reference with S as initial state (prefill); fla's fused_recurrent_rwkv6 (T = 1) /
chunk_rwkv6 (prefill) with S as initial_state
on CUDA with kernels "fla" or "auto" (common.pick_fla) or backend "fla"; kernels "torch" keeps the
torch path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from neollm.kernels.rwkv6 import chunk_rwkv6_ref, rwkv6_decode
from neollm.model.init_utils import copy_full_
from neollm.model.mixers.common import check_backend, check_decode_kernels, resolve_backend, state_dtype
from neollm.model.mixers.common import use_fla_step
from neollm.model.norms import no_weight_decay
from neollm.precision import upcast

__all__ = ["RWKV6", "RWKV6State", "rwkv6_flops_per_token"]


@dataclass
class RWKV6State:
    """An RWKV-6 layer's decode state: the wkv state S [B, H, K, V] (compute dtype) and the previous token's
    input [B, 1, D] (activation dtype, for the token shift); both written in place by ``step``."""

    wkv: Tensor
    shift: Tensor
    kernels: str = "auto"

    def tensors(self) -> list[Tensor]:
        return [self.wkv, self.shift]



def token_shift_delta(x: Tensor) -> Tensor:
    """x_{t-1} - x_t with a zero before the first token (fla's token_shift on [B, T, D])."""
    return F.pad(x, (0, 0, 1, -1)) - x


@torch.no_grad()
def _orthogonal_(param: Tensor, gain: float) -> None:
    """fla's orthogonal init (computed in fp32), also for sharded DTensors (built whole, then distributed)."""
    if param.is_meta:
        return
    full = torch.empty(param.shape, dtype=torch.float32, device=param.device)
    nn.init.orthogonal_(full, gain=gain)
    copy_full_(param, full)


class _LoRA(nn.Module):
    """tanh(x A) B + b, held as ``lora = Sequential(Linear, Tanh, Linear)`` (fla.layers.rwkv6.LoRA)."""

    def __init__(self, input_dim: int, output_dim: int, low_rank_dim: int) -> None:
        super().__init__()
        self.lora = nn.Sequential(
            nn.Linear(input_dim, low_rank_dim, bias=False), nn.Tanh(), nn.Linear(low_rank_dim, output_dim, bias=True)
        )

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.zeros_(self.lora[0].weight)
        out_dim, in_dim = self.lora[2].weight.shape
        gain = math.sqrt(in_dim / out_dim) if in_dim > out_dim else 1.0
        _orthogonal_(self.lora[2].weight, gain=0.1 * gain)
        nn.init.zeros_(self.lora[2].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.lora(x)


class _LerpLinear(nn.Module):
    """Linear(x + delta * mu) with a learned static mu (fla's LerpLinear)."""

    def __init__(self, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim, bias=False)
        self.mu = nn.Parameter(torch.zeros(input_dim))

    def forward(self, x: Tensor, delta: Tensor) -> Tensor:
        return self.linear(x + delta * self.mu)


class _DDLerpLinear(nn.Module):
    """Linear (or LoRA) of x + delta * mu with a data-dependent mu (fla's DDLerpLinear)."""

    def __init__(self, input_dim: int, output_dim: int, low_rank_dim: int | None = None) -> None:
        super().__init__()
        self.linear = (
            nn.Linear(input_dim, output_dim, bias=False) if low_rank_dim is None
            else _LoRA(input_dim, output_dim, low_rank_dim)
        )

    def forward(self, x: Tensor, mu: Tensor, delta: Tensor) -> Tensor:
        return self.linear(x + delta * mu)


class RWKV6(nn.Module):
    """RWKV-6 time mixing, [B, T, D] -> [B, T, D]; backend "fla" (Triton), "torch", or "auto" (fla on CUDA)."""

    torch_chunk_size: int = 16  # the torch path's chunk (its memory grows with C); fla picks its own (64)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        proj_low_rank_dim: int = 32,
        gate_low_rank_dim: int = 64,
        norm_eps: float = 1e-5,
        backend: str = "auto",
        layer_idx: int | None = None,
    ) -> None:
        super().__init__()
        check_backend(backend)
        self.hidden_size = dim
        self.num_heads = num_heads
        self.head_k_dim = self.head_v_dim = head_dim
        self.key_dim = self.value_dim = num_heads * head_dim
        self.proj_low_rank_dim = proj_low_rank_dim
        self.gate_low_rank_dim = gate_low_rank_dim
        self.norm_eps = norm_eps
        self.backend = backend
        self.layer_idx = layer_idx

        # Registration order follows fla's layer so state_dict() lists keys in the same order.
        self.x_proj = nn.Sequential(
            _LerpLinear(dim, proj_low_rank_dim * 5), nn.Tanh(), nn.Linear(proj_low_rank_dim * 5, dim, bias=False)
        )
        self.x_bias = nn.Parameter(torch.zeros(5, dim))
        self.r_proj = _DDLerpLinear(dim, self.key_dim)
        self.w_proj = _DDLerpLinear(dim, self.key_dim, low_rank_dim=gate_low_rank_dim)
        self.k_proj = _DDLerpLinear(dim, self.key_dim)
        self.v_proj = _DDLerpLinear(dim, self.value_dim)
        self.g_proj = _DDLerpLinear(dim, self.value_dim)
        self.bonus = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.g_norm = nn.GroupNorm(num_heads, self.value_dim, eps=norm_eps)  # holds weight/bias; applied in torch
        self.o_proj = nn.Linear(self.value_dim, dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_std: float = 0.02, out_std: float | None = None) -> None:
        """(Re)initialise every parameter (module docstring: fla's rules for the special ones)."""
        for lin in (self.x_proj[0].linear, self.x_proj[2], self.r_proj.linear, self.k_proj.linear,
                    self.v_proj.linear, self.g_proj.linear):
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.o_proj.weight, mean=0.0, std=out_std if out_std is not None else init_std)
        self.w_proj.linear.init_weights()
        for p in (self.x_proj[0].mu, self.x_bias, self.bonus, self.g_norm.bias):
            nn.init.zeros_(p)
        nn.init.ones_(self.g_norm.weight)
        # x_bias [5, D] and bonus [H, K] are 2-D but are offsets/gains, not projections.
        no_weight_decay(self.x_proj[0].mu, self.x_bias, self.bonus, self.g_norm.weight, self.g_norm.bias)

    def _rkvwg(self, x: Tensor, prev: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """r, k, v, w, g of x; ``prev`` [B, 1, D]: the input before x[:, 0] (decoding), else zeros (training)."""
        B, T, D = x.shape
        delta = token_shift_delta(x) if prev is None else torch.cat([prev, x[:, :-1]], dim=1) - x
        m = torch.tanh(self.x_proj[0](x, delta)).view(B, T, 5, self.proj_low_rank_dim)
        mix = torch.einsum("btnr,hnr->btnh", m, self.x_proj[2].weight.view(D, 5, self.proj_low_rank_dim))
        mr, mw, mk, mv, mg = (mix + self.x_bias).unbind(-2)
        H, K = self.num_heads, self.head_k_dim
        r = self.r_proj(x, mr, delta).view(B, T, H, K)
        w = -torch.exp(self.w_proj(x, mw, delta)).view(B, T, H, K)
        k = self.k_proj(x, mk, delta).view(B, T, H, K)
        v = self.v_proj(x, mv, delta).view(B, T, H, self.head_v_dim)
        g = self.g_proj(x, mg, delta)
        return r, k, v, w, g

    def _out(self, o: Tensor, g: Tensor) -> Tensor:
        """Per-head LayerNorm (fla GroupNorm, fp32 inside) times SiLU(g), then o_proj."""
        B, T = o.shape[:2]
        o32 = upcast(o)
        mean = o32.mean(-1, keepdim=True)
        var = (o32 - mean).pow(2).mean(-1, keepdim=True)
        y = ((o32 - mean) * torch.rsqrt(var + self.norm_eps)).reshape(B, T, self.value_dim)
        y = y * upcast(self.g_norm.weight) + upcast(self.g_norm.bias)
        return self.o_proj(y.to(g.dtype) * F.silu(g))

    def forward(self, x: Tensor) -> Tensor:
        backend = resolve_backend(self.backend, x, "RWKV6", setting="rwkv_backend")
        r, k, v, w, g = self._rkvwg(x)
        if backend == "fla":
            o = _fla_wkv(r, k, v, w, self.bonus)
        else:
            o, _ = chunk_rwkv6_ref(r, k, v, w, self.bonus, scale=1.0, chunk_size=self.torch_chunk_size)
        return self._out(o, g)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device, kernels: str = "auto"
                  ) -> RWKV6State:
        """Zero decode state for ``batch`` sequences (max_len unused: the state does not grow)."""
        check_decode_kernels(kernels, device, "RWKV6")
        return RWKV6State(
            torch.zeros(batch, self.num_heads, self.head_k_dim, self.head_v_dim, dtype=state_dtype(dtype),
                        device=device),
            torch.zeros(batch, 1, self.hidden_size, dtype=dtype, device=device), kernels)

    def step(self, x: Tensor, state: RWKV6State, pos=None, rope: Tensor | None = None) -> Tensor:
        """x [B, T, D] of the next T tokens -> [B, T, D], the full forward's rows there; state updated in place
        (pos and rope unused)."""
        r, k, v, w, g = self._rkvwg(x, state.shift.to(x.dtype))
        state.shift.copy_(x[:, -1:])
        if use_fla_step(self.backend, state.kernels, x, "RWKV6"):
            o = _fla_wkv_decode(r, k, v, w, self.bonus, state.wkv)
        else:
            o = rwkv6_decode(r, k, v, w, self.bonus, state.wkv, scale=1.0, chunk_size=self.torch_chunk_size)
        return self._out(o, g)

    def extra_repr(self) -> str:
        return (f"dim={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_k_dim}, "
                f"proj_low_rank_dim={self.proj_low_rank_dim}, gate_low_rank_dim={self.gate_low_rank_dim}, "
                f"backend={self.backend!r}")


@torch.compiler.disable
def _fla_wkv(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor) -> Tensor:
    """fla's chunked RWKV-6 kernel (Triton autograd Function, kept out of torch.compile's graph)."""
    from neollm.model.mixers.common import ensure_fla_workaround
    from fla.ops.rwkv6 import chunk_rwkv6

    ensure_fla_workaround()
    o, _ = chunk_rwkv6(r=r, k=k, v=v, w=w, u=u, scale=1.0, initial_state=None, output_final_state=False)
    return o


@torch.compiler.disable
def _fla_wkv_decode(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor) -> Tensor:
    """fla's fused_recurrent_rwkv6 (T = 1) or chunk_rwkv6 (prefill) from ``state`` [B, H, K, V], updated in place."""
    from neollm.model.mixers.common import ensure_fla_workaround
    from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6

    ensure_fla_workaround()
    fn = fused_recurrent_rwkv6 if r.shape[1] == 1 else chunk_rwkv6
    o, final = fn(r=r, k=k, v=v, w=w, u=u, scale=1.0, initial_state=state, output_final_state=True)
    state.copy_(final)
    return o


def rwkv6_flops_per_token(dim: int, num_heads: int, head_dim: int, proj_low_rank_dim: int,
                          gate_low_rank_dim: int, chunk_size: int = 64) -> int:
    """Training (forward + backward) FLOPs per token of one RWKV6 layer, for MFU.

    Convention as neollm.model.flops (each weight 6 FLOPs per token, elementwise work uncounted). With
    H heads of K = V = head_dim, r = proj_low_rank_dim, g = gate_low_rank_dim, C = fla's chunk (64):
      projections: 6 * (2 * D * 5r + 4 * D * HK + 2 * D * g + HK * D)   [ddlerp LoRA, r k v g, w LoRA, o]
      recurrence per head and token, forward, full C x C blocks as the chunk kernel computes them:
        scores r k^T inside the chunk 2CK, their product with v 2CV, inter-chunk r S 2KV,
        state update k^T v 2KV  ->  2C(K + V) + 4KV, times 3 for forward + backward.
    At D=512, H=8, K=64 this is ~9.24M (projections) + ~0.79M (recurrence) FLOPs per token.
    """
    H, K, C = num_heads, head_dim, chunk_size
    hk = H * K
    weights = 2 * dim * 5 * proj_low_rank_dim + 4 * dim * hk + 2 * dim * gate_low_rank_dim + hk * dim
    recurrence = 3 * H * (2 * C * (K + K) + 4 * K * K)
    return 6 * weights + recurrence
