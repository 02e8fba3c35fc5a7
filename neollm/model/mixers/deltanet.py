"""NeoLLM's Gated DeltaNet mixer: fla's GatedDeltaNet layer, meta-device friendly, with a pure-PyTorch path.

Why our own module rather than ``fla.layers.GatedDeltaNet``: the trainer builds models on the meta device and
re-initialises them with ``init_weights()``, and CPU runs need a path without Triton. Parameter names and shapes
are those of ``fla.layers.GatedDeltaNet(hidden_size=dim, head_dim=head_dim, num_heads=num_heads,
expand_v=expand_v, mode='chunk', use_gate=True, use_short_conv=True, conv_size=conv_size)`` (fla 0.6.0,
fla/layers/gated_deltanet.py:148-198), so state dicts load either way.

Math (fla/layers/gated_deltanet.py:247-354 on the training path, no cache / mask / varlen):
    q, k, v = SiLU(causal_depthwise_conv(x W_q | W_k | W_v))       (ShortConvolution, no bias)
    q, k    = q / sqrt(|q|^2 + 1e-6), k likewise                     (fla l2norm, eps inside the sqrt)
    beta    = sigmoid(x W_b);  g = -exp(A_log) * softplus(x W_a + dt_bias)   (log decay <= 0)
    o       = gated delta rule(q, k, v, g, beta), scale K^-0.5
    y       = W_o( RMSNorm_eps(o) * o_norm.weight * SiLU(x W_g) )     (per head over V, fp32 inside)

Decoding (``new_state`` / ``step``, driven by neollm.inference): the state is the recurrent S [B, H, K, V]
(compute dtype) and the short convs' last conv_size - 1 projected inputs (zeros at the start = the
training path's causal zero padding). Nothing depends on the position, so one ``step`` serves the
prefill, dynamic decoding and the static (CUDA-graph) step. Kernels: the torch recurrence for one token,
the chunked reference with an initial state for a chunk; on CUDA (``kernels`` "auto" with backend
"auto"/"fla", or "fla") fla's ``fused_recurrent_gated_delta_rule`` / ``chunk_gated_delta_rule``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from neollm.kernels import gdn_ops
from neollm.kernels.gated_delta_rule import chunk_gated_delta_rule_ref
from neollm.kernels.gdn_ops import causal_conv1d_silu_ref
from neollm.model.mixers.common import (
    GatedRMSNorm, causal_conv_step, check_backend, check_decode_kernels, l2norm, pick_fla, resolve_backend, state_dtype,
)
from neollm.precision import upcast

__all__ = ["GatedDeltaNet", "GDNState", "gdn_flops_per_token"]


@dataclass
class GDNState:
    """One Gated DeltaNet layer's decode state (updated in place by ``GatedDeltaNet.step``)."""

    recurrent: Tensor  # [B, H, K, V] S (compute dtype)
    conv_q: Tensor     # [B, conv_size - 1, H K] last projected inputs of each short conv
    conv_k: Tensor     # [B, conv_size - 1, H K]
    conv_v: Tensor     # [B, conv_size - 1, H V]
    use_fla: bool      # fla's kernels (CUDA) rather than the torch references

    def tensors(self) -> list[Tensor]:
        """Every allocated tensor (for reset and address checks)."""
        return [self.recurrent, self.conv_q, self.conv_k, self.conv_v]


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer, [B, T, D] -> [B, T, D]; backend "fla" (Triton), "torch", or "auto".

    "auto" picks fla when the input is on CUDA, else the pure-torch path (our chunked reference).
    """

    chunk_size: int = 64  # fla's default chunk for chunk_gated_delta_rule; the torch path uses the same

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        expand_v: float = 2.0,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        backend: str = "auto",
        layer_idx: int | None = None,
    ) -> None:
        super().__init__()
        check_backend(backend)
        head_v_dim = head_dim * expand_v
        if not math.isclose(head_v_dim, round(head_v_dim), rel_tol=0, abs_tol=1e-6):
            raise ValueError(f"head_dim * expand_v must be an integer, got {head_dim} * {expand_v}")
        self.hidden_size = dim
        self.num_heads = num_heads
        self.head_dim = self.head_k_dim = head_dim
        self.expand_v = expand_v
        self.head_v_dim = int(round(head_v_dim))
        self.key_dim = num_heads * head_dim
        self.value_dim = num_heads * self.head_v_dim
        self.conv_size = conv_size
        self.norm_eps = norm_eps
        self.backend = backend
        self.layer_idx = layer_idx

        # Registration order follows fla's layer so state_dict() lists keys in the same order.
        self.q_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.value_dim, bias=False)
        self.a_proj = nn.Linear(dim, num_heads, bias=False)
        self.b_proj = nn.Linear(dim, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(num_heads, dtype=torch.float32))
        self.q_conv1d = self._make_conv(self.key_dim)
        self.k_conv1d = self._make_conv(self.key_dim)
        self.v_conv1d = self._make_conv(self.value_dim)
        self.g_proj = nn.Linear(dim, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, dim, bias=False)
        self.init_weights()

    def _make_conv(self, channels: int) -> nn.Conv1d:
        # Same parameter as fla's ShortConvolution (an nn.Conv1d subclass): weight [C, 1, W], no bias.
        return nn.Conv1d(channels, channels, self.conv_size, groups=channels, padding=self.conv_size - 1, bias=False)

    @torch.no_grad()
    def init_weights(self, init_std: float = 0.02, out_std: float | None = None) -> None:
        """(Re)initialise every parameter; safe on meta tensors and, being in-place, on sharded DTensors.

        Linear weights ~ N(0, init_std), o_proj ~ N(0, out_std or init_std), convs as nn.Conv1d's default,
        o_norm.weight = 1, and fla's formulas (fla/layers/gated_deltanet.py:154-164):
        A ~ U(0, 16), A_log = log A;  dt = exp(U(0,1) (ln 0.1 - ln 1e-3) + ln 1e-3) clamped >= 1e-4,
        dt_bias = dt + log(-expm1(-dt)) (inverse softplus, so softplus(dt_bias) = dt in [1e-3, 0.1]).
        """
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.g_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.o_proj.weight, mean=0.0, std=out_std if out_std is not None else init_std)
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.reset_parameters()
        self.o_norm.reset_parameters()

        self.A_log.uniform_(0.0, 16.0).log_()
        dt_min, dt_max, dt_floor = 1e-3, 1e-1, 1e-4
        dt = self.dt_bias
        dt.uniform_(0.0, 1.0).mul_(math.log(dt_max) - math.log(dt_min)).add_(math.log(dt_min)).exp_()
        dt.clamp_(min=dt_floor)
        dt.add_(torch.log(-torch.expm1(-dt)))
        # fla's flag for optimizers that group parameters (these two should not be weight-decayed).
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def forward(self, x: Tensor) -> Tensor:
        """"fla"/"auto" (and "torch" on CPU) run the custom ops of neollm.kernels.gdn_ops, which are fla's
        Triton kernels on CUDA and the pure-PyTorch references on CPU, so a compiled block is one graph;
        "torch" on CUDA calls the references directly (the GPU tests' ground truth)."""
        backend = resolve_backend(self.backend, x, "GatedDeltaNet")
        if backend == "torch" and x.is_cuda:
            return self._mix(x, causal_conv1d_silu_ref, _rule_reference)
        return self._mix(x, gdn_ops.causal_conv1d_silu, gdn_ops.chunk_gated_delta_rule)

    def _mix(self, x: Tensor, conv, rule) -> Tensor:
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        # One conv over the concatenated q/k/v channels (fla's fused qkv conv path, taken without cache or varlen).
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        weight = torch.cat([c.weight.squeeze(1) for c in (self.q_conv1d, self.k_conv1d, self.v_conv1d)], dim=0)
        q, k, v = conv(qkv, weight.to(qkv.dtype)).split([H * K, H * K, H * V], dim=-1)
        q = l2norm(q.reshape(B, T, H, K)).to(v.dtype)
        k = l2norm(k.reshape(B, T, H, K)).to(v.dtype)
        beta = torch.sigmoid(upcast(self.b_proj(x)))  # fp32, as fla's in-kernel sigmoid (fused_beta_sigmoid) keeps it
        g = -upcast(self.A_log).exp() * F.softplus(upcast(self.a_proj(x)) + upcast(self.dt_bias))
        o = rule(q, k, v.reshape(B, T, H, V), g, beta, K ** -0.5, self.chunk_size)
        gate = self.g_proj(x).reshape(B, T, H, V)
        o = self.o_norm(o, gate).reshape(B, T, H * V)
        return self.o_proj(o)

    # ---- decoding (see the module docstring) ----------------------------------------------
    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str,
                  kernels: str = "auto") -> GDNState:
        """Zeroed state (``max_len`` is unused: the state does not grow). ``kernels``: "torch" (or
        backend "torch") the references; "fla" (or backend "fla") fla's kernels, CUDA only; "auto"
        fla on CUDA."""
        check_decode_kernels(kernels, device, "GatedDeltaNet")
        use_fla = pick_fla(self.backend, kernels, torch.device(device).type == "cuda", "GatedDeltaNet")
        history = self.conv_size - 1
        return GDNState(
            recurrent=torch.zeros(batch, self.num_heads, self.head_k_dim, self.head_v_dim,
                                  dtype=state_dtype(dtype), device=device),
            conv_q=torch.zeros(batch, history, self.key_dim, dtype=dtype, device=device),
            conv_k=torch.zeros(batch, history, self.key_dim, dtype=dtype, device=device),
            conv_v=torch.zeros(batch, history, self.value_dim, dtype=dtype, device=device),
            use_fla=use_fla,
        )

    def step(self, x: Tensor, state: GDNState, pos: int | Tensor, rope: Tensor) -> Tensor:
        """``forward`` for T new tokens x [B, T, D] continuing from ``state`` (updated in place);
        ``pos`` and ``rope`` are unused (the recurrence is position-free)."""
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q = F.silu(causal_conv_step(self.q_proj(x), self.q_conv1d.weight, state.conv_q)).reshape(B, T, H, K)
        k = F.silu(causal_conv_step(self.k_proj(x), self.k_conv1d.weight, state.conv_k)).reshape(B, T, H, K)
        v = F.silu(causal_conv_step(self.v_proj(x), self.v_conv1d.weight, state.conv_v)).reshape(B, T, H, V)
        if state.use_fla:
            o, recurrent = _fla_recurrence(self, x, q, k, v, state.recurrent)
        else:
            q, k = l2norm(q), l2norm(k)
            beta = torch.sigmoid(upcast(self.b_proj(x)))
            g = -upcast(self.A_log).exp() * F.softplus(upcast(self.a_proj(x)) + upcast(self.dt_bias))
            if T == 1:
                o, recurrent = _recurrent_step(q, k, v, g, beta, state.recurrent)
            else:
                o, recurrent = chunk_gated_delta_rule_ref(q, k, v, g, beta, chunk_size=self.chunk_size,
                                                          initial_state=state.recurrent, output_final_state=True)
        state.recurrent.copy_(recurrent)
        gate = self.g_proj(x).reshape(B, T, H, V)
        o = self.o_norm(o, gate).reshape(B, T, H * V)
        return self.o_proj(o)

    def extra_repr(self) -> str:
        return (
            f"dim={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_k_dim}, "
            f"head_v_dim={self.head_v_dim}, conv_size={self.conv_size}, backend={self.backend!r}"
        )


def _recurrent_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                    state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the gated delta rule (kernels.gated_delta_rule.recurrent_gated_delta_rule
    for T = 1, with elementwise products instead of tiny batched matmuls):
    S' = exp(g) S;  u = beta (v - S'^T k);  S = S' + k u^T;  o = S^T (q / sqrt(K))."""
    K = q.shape[-1]
    dt = torch.float64 if any(t.dtype == torch.float64 for t in (q, k, v, g, beta)) else torch.float32
    q1, k1, v1 = q[:, 0].to(dt) * K ** -0.5, k[:, 0].to(dt), v[:, 0].to(dt)  # [B, H, *]
    S = state.to(dt) * g[:, 0].to(dt).exp()[..., None, None]
    u = beta[:, 0].to(dt)[..., None] * (v1 - (k1[..., None] * S).sum(-2))
    S = S + k1[..., None] * u[..., None, :]
    o = (q1[..., None] * S).sum(-2)
    return o[:, None].to(v.dtype), S


@torch.compiler.disable  # a graph break under torch.compile (the static decoder's "compile" mode)
def _fla_recurrence(m: GatedDeltaNet, x: Tensor, q: Tensor, k: Tensor, v: Tensor,
                    state: Tensor) -> tuple[Tensor, Tensor]:
    """fla's kernels with the same in-kernel gating as the training path (l2norm, sigmoid beta,
    -exp(A_log) softplus(a + dt_bias)); state [B, H, K, V] fp32 (state_v_first=False), returns
    the new state (a new tensor: the caller copies it into the decode state).

    For T = 1 this is ``fused_recurrent_gated_delta_rule``: one Triton launch on a fixed grid for
    dense inputs (no cu_seqlens), no host synchronisation, its outputs allocated by torch: it can
    be captured in a CUDA graph once it has been compiled (the decoder's warm-up step)."""
    from neollm.model.mixers.common import ensure_fla_workaround

    ensure_fla_workaround()
    kwargs = dict(
        g=m.a_proj(x), beta=m.b_proj(x), initial_state=state, output_final_state=True,
        use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_gate_in_kernel=True,
        A_log=m.A_log, dt_bias=m.dt_bias, state_v_first=False,
    )
    if q.shape[1] == 1:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

        o, new_state = fused_recurrent_gated_delta_rule(q=q, k=k, v=v, **kwargs)
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        o, new_state = chunk_gated_delta_rule(q=q, k=k, v=v, **kwargs)
    return o, new_state


def _rule_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float, chunk_size: int) -> Tensor:
    return chunk_gated_delta_rule_ref(q, k, v, g, beta, scale=scale, chunk_size=chunk_size)[0]


def gdn_flops_per_token(
    dim: int,
    num_heads: int,
    head_dim: int,
    expand_v: float,
    conv_size: int,
    chunk_size: int = 64,
) -> int:
    """Training (forward + backward) FLOPs per token of one GatedDeltaNet layer, for MFU.

    Convention as neollm.model.flops: a matmul costs 2 FLOPs per multiply-add forward and twice that backward
    (x3 total); elementwise work (norms, gates, activations) is not counted; recomputation is not counted.
    With H heads, K = head_dim, V = head_dim * expand_v, C = chunk_size:
      projections: 6 * (D(2HK + 2HV + 2H) + HV D)        [q, k, v, g, a, b and o_proj weights]
      short conv:  6 * conv_size * (2HK + HV)            [depthwise taps]
      recurrence, per head and token, forward, counting full C x C blocks as the kernels compute them:
        K K^T inside the chunk (the A matrix)             2CK
        inverting the unit-triangular (I + A)             C^2 / 3   (C^3/3 per chunk)
        W = T beta (K Gamma), U = T beta V                2C(K + V)
        V_new = U - W S                                   2KV
        O = (Q Gamma) S                                   2KV
        + (Q K^T * decay) V_new                           2CK + 2CV
        S <- decay S + (K decay)^T V_new                  2KV
      = 6CK + 4CV + 6KV + C^2/3, times 3 for forward + backward.
    At D=512, H=4, K=64, V=128 this is ~6.4M (projections) + ~1.3M (recurrence) FLOPs per token.
    """
    H, K, C = num_heads, head_dim, chunk_size
    V = int(round(head_dim * expand_v))
    key_dim, value_dim = H * K, H * V
    linear_params = dim * (2 * key_dim + 2 * value_dim + 2 * H) + value_dim * dim
    projections = 6 * linear_params
    conv = 6 * conv_size * (2 * key_dim + value_dim)
    recurrence = H * (3 * (6 * C * K + 4 * C * V + 6 * K * V) + C * C)  # 3 * C^2/3 = C^2
    return projections + conv + recurrence
