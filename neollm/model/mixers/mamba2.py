"""Mamba2 (SSD, arXiv 2405.21060) token mixer: fla's layer, meta-device friendly, on fla's own kernels.

Parameter names and shapes are those of ``fla.layers.Mamba2(hidden_size=dim, head_dim=P, state_size=N,
expand=E, n_groups=1, conv_kernel=W)`` with fla 0.6.0's defaults otherwise (conv bias, no projection bias,
gated RMSNorm after the scan with norm_before_gate=False, D per head, no dt limit), so state dicts load
either way. H = E * dim / P heads.

Math (fla/layers/mamba2.py ``torch_forward``, training path):
    z | xBC | dt = x W_in                                   (widths E*dim | E*dim + 2N | H)
    x_s | B | C = SiLU(causal_depthwise_conv(xBC) + b)      (B, C [N] shared by all heads: one group)
    dt = softplus(dt + dt_bias);  A = -exp(A_log)           (per head)
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,   y_t = h_t^T C_t + D x_t      (state [N, P] per head)
    out = W_out( RMSNorm(y * SiLU(z)) * norm.weight )      (one norm group over E*dim)

GPU path. fla's layer runs mamba_ssm's fused Triton kernels (mamba_split_conv1d_scan_combined) when
``mamba_ssm`` and ``causal_conv1d`` are installed; we have neither, and fla's layer would then fall back to its
pure-torch SSD on the GPU too. fla ships the same recurrence as a Triton op, though: the scan above is
simple-GLA with q = C, k = B, v = dt * x, per-head log decay g = dt * A and scale 1, so the GPU path runs
fla's causal_conv1d (Triton), ``chunk_simple_gla`` (chunk 64) and its gated-RMSNorm kernel (``rmsnorm_fn``).
Speed consequence: three kernels plus the [B, T, H, N] broadcast of B and C instead of mamba_ssm's one fused
kernel (which never materialises per-head B and C) -- more memory traffic, but no pure-torch scan on the GPU.
The CPU path is the same mapping on our chunked reference (neollm.kernels.linear_attention).

Decode state (``new_state`` / ``step``): ``Mamba2State.ssm`` h [B, H, N, P] in the compute dtype (fp32, fp64
kept; zeros = the training forward's zero initial state) and ``conv`` [B, W-1, E*dim + 2N], the last W-1
pre-conv xBC inputs in the activation dtype (zeros = the conv's causal zero padding). A step runs the conv as a
multiply-sum over the windows (in torch on every device) and the scan as the one-token recurrence (T = 1) or
the chunked torch reference with h as initial state (prefill); fla's fused_recurrent_simple_gla (T = 1) /
chunk_simple_gla (prefill) with h as initial_state
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

from neollm.kernels.linear_attention import chunk_simple_gla_ref, gla_decode
from neollm.model.mixers.common import (
    causal_conv_step, check_backend, check_decode_kernels, ensure_fla_workaround, linear_attention_recurrence_flops,
    resolve_backend, state_dtype, use_fla_step,
)
from neollm.precision import upcast

__all__ = ["Mamba2", "Mamba2State", "mamba2_flops_per_token"]


@dataclass
class Mamba2State:
    """A Mamba2 layer's decode state: the SSM state h [B, H, N, P] (compute dtype) and the conv inputs
    [B, W-1, conv_dim] (activation dtype); both written in place by ``step``."""

    ssm: Tensor
    conv: Tensor
    kernels: str = "auto"

    def tensors(self) -> list[Tensor]:
        return [self.ssm, self.conv]


class Mamba2(nn.Module):
    """Mamba2 mixer, [B, T, D] -> [B, T, D]; backend "fla" (fla Triton ops), "torch", or "auto"."""

    chunk_size: int = 64  # torch path; fla's chunk_simple_gla uses 64 (fla's layer: 256 for mamba_ssm)
    n_groups: int = 1

    def __init__(self, dim: int, head_dim: int = 64, state_size: int = 128, expand: int = 2, conv_size: int = 4,
                 norm_eps: float = 1e-5, backend: str = "auto", layer_idx: int | None = None) -> None:
        super().__init__()
        check_backend(backend)
        inner = expand * dim
        if inner % head_dim:
            raise ValueError(f"Mamba2: expand * dim ({inner}) must be a multiple of head_dim ({head_dim})")
        self.hidden_size = dim
        self.intermediate_size = inner
        self.head_dim = head_dim
        self.num_heads = inner // head_dim
        self.ssm_state_size = state_size
        self.conv_kernel_size = conv_size
        self.conv_dim = inner + 2 * self.n_groups * state_size
        self.norm_eps = norm_eps
        self.backend = backend
        self.layer_idx = layer_idx
        # Registration order follows fla's layer so state_dict() lists keys in the same order.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_size, groups=self.conv_dim,
                                padding=conv_size - 1, bias=True)
        self.in_proj = nn.Linear(dim, inner + self.conv_dim + self.num_heads, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.norm = _NormHolder(inner)
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_std: float = 0.02, out_std: float | None = None) -> None:
        """in_proj ~ N(0, init_std), out_proj ~ N(0, out_std or init_std), conv as nn.Conv1d's default, norm 1,
        and fla's Mamba2 formulas (fla/layers/mamba2.py, fla/models/mamba2 _init_weights): A ~ U(1, 16),
        A_log = log A; dt = exp(U(ln 1e-3, ln 0.1)) clamped >= 1e-4, dt_bias = softplus^-1(dt); D = 1.
        A_log, dt_bias and D carry fla's ``_no_weight_decay`` flag."""
        nn.init.normal_(self.in_proj.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=out_std if out_std is not None else init_std)
        self.conv1d.reset_parameters()
        nn.init.ones_(self.norm.weight)
        self.A_log.uniform_(1.0, 16.0).log_()
        dt = self.dt_bias
        dt.uniform_(0.0, 1.0).mul_(math.log(0.1) - math.log(1e-3)).add_(math.log(1e-3)).exp_().clamp_(min=1e-4)
        dt.add_(torch.log(-torch.expm1(-dt)))
        nn.init.ones_(self.D)
        for p in (self.A_log, self.dt_bias, self.D):
            p._no_weight_decay = True

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.split(self.in_proj(x), [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        backend = resolve_backend(self.backend, x, "Mamba2")
        z, xbc, dt = self._split(x)
        if backend == "fla":
            y = _fla_mamba2(z, xbc, dt, self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D,
                            self.norm.weight, (self.num_heads, self.head_dim, self.ssm_state_size), self.norm_eps)
            return self.out_proj(y)
        T, W = x.shape[1], self.conv_kernel_size
        xbc = F.conv1d(xbc.transpose(1, 2), self.conv1d.weight.to(xbc.dtype), self.conv1d.bias.to(xbc.dtype),
                       padding=W - 1, groups=self.conv_dim)[..., :T]
        q, k, v, g, xs = self._scan_inputs(F.silu(xbc.transpose(1, 2)), dt)
        y, _ = chunk_simple_gla_ref(q, k, v, g, scale=1.0, chunk_size=self.chunk_size)
        return self._output(y, xs, z, x.dtype)

    def _scan_inputs(self, xbc: Tensor, dt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The SSD scan as simple GLA (module docstring) from the activated conv output: q = C, k = B,
        v = dt x, g = dt A, in the compute dtype; and x per head (for the D skip)."""
        B, T, _ = xbc.shape
        H, P, N = self.num_heads, self.head_dim, self.ssm_state_size
        xs, Bm, Cm = torch.split(xbc, [self.intermediate_size, N, N], dim=-1)
        xs = upcast(xs).reshape(B, T, H, P)
        dt = F.softplus(upcast(dt) + upcast(self.dt_bias))  # [B, T, H]
        g = -torch.exp(upcast(self.A_log)) * dt
        q = upcast(Cm)[:, :, None, :].expand(B, T, H, N)
        k = upcast(Bm)[:, :, None, :].expand(B, T, H, N)
        return q, k, xs * dt[..., None], g, xs

    def _output(self, y: Tensor, xs: Tensor, z: Tensor, dtype: torch.dtype) -> Tensor:
        """D skip, gated RMSNorm, out_proj."""
        B, T = y.shape[:2]
        y = (y + upcast(self.D)[:, None] * xs).reshape(B, T, self.intermediate_size)
        y = _gated_rmsnorm(y, z, self.norm.weight, self.norm_eps)
        return self.out_proj(y.to(dtype))

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device, kernels: str = "auto"
                  ) -> Mamba2State:
        """Zero decode state for ``batch`` sequences (max_len unused: the state does not grow)."""
        check_decode_kernels(kernels, device, "Mamba2")
        return Mamba2State(
            torch.zeros(batch, self.num_heads, self.ssm_state_size, self.head_dim, dtype=state_dtype(dtype),
                        device=device),
            torch.zeros(batch, self.conv_kernel_size - 1, self.conv_dim, dtype=dtype, device=device), kernels)

    def step(self, x: Tensor, state: Mamba2State, pos=None, rope: Tensor | None = None) -> Tensor:
        """x [B, T, D] of the next T tokens -> [B, T, D], the full forward's rows there; state updated in place
        (pos and rope unused)."""
        z, xbc, dt = self._split(x)
        xbc = F.silu(causal_conv_step(xbc, self.conv1d.weight, state.conv, self.conv1d.bias))
        q, k, v, g, xs = self._scan_inputs(xbc, dt)
        if use_fla_step(self.backend, state.kernels, x, "Mamba2"):
            y = _fla_scan_decode(q, k, v, g, state.ssm)
        else:
            y = gla_decode(q, k, v, g, state.ssm, scale=1.0, chunk_size=self.chunk_size)
        return self._output(y, xs, z, x.dtype)

    def extra_repr(self) -> str:
        return (f"dim={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"state_size={self.ssm_state_size}, conv_size={self.conv_kernel_size}, backend={self.backend!r}")


class _NormHolder(nn.Module):
    """Holds ``norm.weight`` [E*dim] as fla's RMSNormGated does (its math is _gated_rmsnorm / fla's rmsnorm_fn)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))


def _gated_rmsnorm(y: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    """fla's RMSNormGated with norm_before_gate=False and one group: RMSNorm(y * SiLU(z)) * weight, in fp32+."""
    h = upcast(y) * F.silu(upcast(z))
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * upcast(weight)


@torch.compiler.disable
def _fla_mamba2(z: Tensor, xbc: Tensor, dt: Tensor, conv_w: Tensor, conv_b: Tensor, dt_bias: Tensor, A_log: Tensor,
                D: Tensor, norm_w: Tensor, dims: tuple[int, int, int], eps: float) -> Tensor:
    """fla's Triton causal_conv1d + chunk_simple_gla (the SSD scan) + gated RMSNorm; out of torch.compile's graph."""
    from fla.modules.convolution import causal_conv1d
    from fla.modules.norm.layernorm_gated import rmsnorm_fn
    from fla.ops.simple_gla import chunk_simple_gla

    ensure_fla_workaround()
    H, P, N = dims
    B, T, _ = xbc.shape
    xbc, _ = causal_conv1d(x=xbc.contiguous(), weight=conv_w.squeeze(1), bias=conv_b, activation="silu",
                           backend="triton")
    xs, Bm, Cm = torch.split(xbc, [H * P, N, N], dim=-1)
    dt = F.softplus(dt.float() + dt_bias.float())
    g = -torch.exp(A_log.float()) * dt
    xs = xs.reshape(B, T, H, P)
    q = Cm[:, :, None, :].expand(B, T, H, N).contiguous()
    k = Bm[:, :, None, :].expand(B, T, H, N).contiguous()
    v = (xs.float() * dt[..., None]).to(xs.dtype)
    y, _ = chunk_simple_gla(q=q, k=k, v=v, g=g, scale=1.0, initial_state=None, output_final_state=False)
    y = (y.float() + D.float()[:, None] * xs.float()).to(xs.dtype).reshape(B, T, H * P)
    return rmsnorm_fn(x=y, weight=norm_w, bias=None, z=z.contiguous(), eps=eps, group_size=H * P, norm_before_gate=False)


@torch.compiler.disable
def _fla_scan_decode(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor) -> Tensor:
    """The SSD scan on fla's fused_recurrent_simple_gla (T = 1) or chunk_simple_gla (prefill), scale 1, from
    ``state`` [B, H, N, P], updated in place. q and k are the per-head broadcasts of C and B (made contiguous)."""
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    ensure_fla_workaround()
    fn = fused_recurrent_simple_gla if q.shape[1] == 1 else chunk_simple_gla
    o, final = fn(q=q.contiguous(), k=k.contiguous(), v=v, g=g, scale=1.0, initial_state=state,
                  output_final_state=True)
    state.copy_(final)
    return o


def mamba2_flops_per_token(dim: int, head_dim: int, state_size: int, expand: int, conv_size: int,
                           chunk_size: int = 64) -> int:
    """Training (fwd + bwd) FLOPs per token of one Mamba2 layer, neollm.model.flops's convention.
    With I = expand * dim, H = I / P heads, N = state_size:
      projections: 6 (D (2I + 2N + H) + I D)          [in_proj (z, x, B, C, dt), out_proj]
      short conv:  6 W (I + 2N)                        [depthwise taps over x, B, C]
      scan:        3 H (2C(N + P) + 4NP)               (SSD as chunked linear attention with key N and
                                                        value P: common.linear_attention_recurrence_flops)
    The D skip, softplus, decays and the gated norm are elementwise (not counted).
    At D=512, P=64, N=128, E=2 (H=16): ~10.3M (projections) + ~2.9M (scan).
    """
    inner = expand * dim
    H, N, P = inner // head_dim, state_size, head_dim
    linear = dim * (2 * inner + 2 * N + H) + inner * dim
    return 6 * linear + 6 * conv_size * (inner + 2 * N) + linear_attention_recurrence_flops(H, N, P, chunk_size)
