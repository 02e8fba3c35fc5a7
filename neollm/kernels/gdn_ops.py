"""Gated DeltaNet's two fla kernels as torch.library custom ops, so a compiled GDN block is one graph.

Why: fla 0.6.0 wraps ``chunk_gated_delta_rule`` in ``torch.compiler.disable`` (fla/ops/gated_delta_rule/chunk.py)
and its causal conv is an autograd Function around autotuned Triton launches that dynamo cannot trace, so
every compiled GDN block broke into several graphs run eagerly between them. A custom op is opaque to
dynamo and AOTAutograd: the block traces whole, inductor fuses everything around the two ops, and the ops
run fla's kernels.

Ops (the ``neollm`` namespace; each has a separate backward op, so the backward is a node of the compiled
backward graph too):
* ``neollm::causal_conv1d_silu(x [B, T, C], weight [C, W]) -> y``: y_t = SiLU(sum_j weight[:, j] x_{t-W+1+j}),
  fla's ShortConvolution without bias (no cache, no varlen).
* ``neollm::chunk_gated_delta_rule(q, k, v, g, beta, scale, chunk_size) -> o``: the gated delta rule of
  neollm/kernels/gated_delta_rule.py (q, k [B, T, H, K] already L2-normalised; v [B, T, H, V]; g the log decay
  and beta the write strength, both [B, T, H]); no initial or final state (training).

Implementations: CUDA runs fla's Triton kernels (with fla_compat's Hopper fix installed first); CPU runs the
project's pure-PyTorch references, and their backward is autograd through the same reference, so the CPU
tests exercise the very op (schema, fake, autograd formula) that the GPU runs. The CUDA backward recomputes
fla's intra-chunk WY factor (the ``A`` matrix) from the inputs rather than saving it: the op's outputs
stay the mathematical result, equal on every device, and the recompute is one of fla's smaller kernels.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from neollm.kernels.gated_delta_rule import chunk_gated_delta_rule_ref

__all__ = ["causal_conv1d_silu", "causal_conv1d_silu_ref", "chunk_gated_delta_rule", "GDN_OPS"]


def causal_conv1d_silu_ref(x: Tensor, weight: Tensor) -> Tensor:
    """Causal depthwise conv1d + SiLU on x [B, T, C] with weight [C, W] (no bias), in x's dtype."""
    T, W = x.shape[1], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight.to(x.dtype).unsqueeze(1), padding=W - 1, groups=x.shape[-1])[..., :T]
    return F.silu(y.transpose(1, 2))


def _check_conv(x: Tensor, weight: Tensor) -> None:
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"causal_conv1d_silu needs x [B, T, C] and weight [C, W]; got {tuple(x.shape)} and {tuple(weight.shape)}"
        )


_AUTOGRAD_KEYS = ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor")  # c10's autograd_dispatch_keyset


@contextlib.contextmanager
def _autograd_inside_kernel():
    """Let autograd record inside a custom op's kernel.

    The kernel runs below the Autograd dispatch key (custom_op's autograd wrapper calls it under
    AutoDispatchBelowAutograd, which adds the autograd keys to the thread's exclude set), where ops record
    no graph. This removes exactly those keys for the duration; everything else in the thread's
    dispatch state (modes, autocast exclusion) stays as it is.
    """
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in _AUTOGRAD_KEYS:
        exclude = exclude.remove(getattr(torch._C.DispatchKey, name))
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _reference_grads(fn, inputs: tuple[Tensor, ...], grad_out: Tensor) -> tuple[Tensor, ...]:
    """Gradients of fn(*inputs) against grad_out by autograd through the reference (the CPU backward)."""
    with _autograd_inside_kernel():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        grads = torch.autograd.grad(fn(*leaves), leaves, grad_out)
    return tuple(g.contiguous() for g in grads)


# --------------------------------------------------------------------------------------------- short conv
@torch.library.custom_op("neollm::causal_conv1d_silu", mutates_args=(), device_types="cpu")
def causal_conv1d_silu(x: Tensor, weight: Tensor) -> Tensor:
    _check_conv(x, weight)
    with torch.autocast("cpu", enabled=False):
        return causal_conv1d_silu_ref(x, weight).contiguous()


@causal_conv1d_silu.register_kernel("cuda")
def _conv_cuda(x: Tensor, weight: Tensor) -> Tensor:
    from fla.modules.causal_conv1d.ops import causal_conv1d_fwd

    _check_conv(x, weight)
    with torch.cuda.device(x.device):
        y, _ = causal_conv1d_fwd(x=x.contiguous(), weight=weight.contiguous(), bias=None, residual=None,
                                 activation="silu")
    return y


@causal_conv1d_silu.register_fake
def _conv_fake(x: Tensor, weight: Tensor) -> Tensor:
    _check_conv(x, weight)
    return x.new_empty(x.shape)


@torch.library.custom_op("neollm::causal_conv1d_silu_bwd", mutates_args=(), device_types="cpu")
def _conv_bwd(x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    with torch.autocast("cpu", enabled=False):
        return _reference_grads(causal_conv1d_silu_ref, (x, weight), dy)


@_conv_bwd.register_kernel("cuda")
def _conv_bwd_cuda(x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    from fla.modules.causal_conv1d.ops import causal_conv1d_bwd

    with torch.cuda.device(x.device):
        dx, dw, _, _, _ = causal_conv1d_bwd(x=x.contiguous(), dy=dy.contiguous(), dht=None,
                                            weight=weight.contiguous(), activation="silu")
    return dx, dw


@_conv_bwd.register_fake
def _conv_bwd_fake(x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _conv_setup(ctx, inputs, output) -> None:
    x, weight = inputs
    ctx.save_for_backward(x, weight)


def _conv_backward(ctx, dy: Tensor):
    x, weight = ctx.saved_tensors
    return tuple(_conv_bwd(x, weight, dy))


causal_conv1d_silu.register_autograd(_conv_backward, setup_context=_conv_setup)


# --------------------------------------------------------------------------------------------- delta rule
def _check_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, chunk_size: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"chunk_gated_delta_rule needs q, k [B, T, H, K] and v [B, T, H, V]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if g.shape != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(f"chunk_gated_delta_rule needs g and beta [B, T, H] = {tuple(q.shape[:3])}; got "
                         f"{tuple(g.shape)}, {tuple(beta.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"chunk_gated_delta_rule needs q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size must be 16, 32 or 64 (fla's kernels), got {chunk_size}")


def _rule_ref(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float, chunk_size: int) -> Tensor:
    o, _ = chunk_gated_delta_rule_ref(q, k, v, g, beta, scale=scale, chunk_size=chunk_size)
    return o


@torch.library.custom_op("neollm::chunk_gated_delta_rule", mutates_args=(), device_types="cpu")
def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
                           chunk_size: int = 64) -> Tensor:
    _check_rule(q, k, v, g, beta, chunk_size)
    return _rule_ref(q, k, v, g, beta, scale, chunk_size).contiguous()


_fla_checked = False


def _fla_gdn():
    """fla's GDN module, with fla_compat's Hopper fix applied (checked once per process)."""
    global _fla_checked
    from fla.ops.gated_delta_rule import chunk as fla_chunk

    if not _fla_checked:
        from neollm.kernels.fla_compat import install_fla_hopper_workaround

        install_fla_hopper_workaround()  # patches fla_chunk.chunk_bwd_dqkwg on Hopper + Triton [3.4, 3.7.1)
        _fla_checked = True
    return fla_chunk


@chunk_gated_delta_rule.register_kernel("cuda")
def _rule_cuda(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
               chunk_size: int = 64) -> Tensor:
    _check_rule(q, k, v, g, beta, chunk_size)
    fla_chunk = _fla_gdn()
    with torch.cuda.device(q.device):
        _, o, _, _, _, _ = fla_chunk.chunk_gated_delta_rule_fwd(
            q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), g=g.contiguous(), beta=beta.contiguous(),
            scale=scale, initial_state=None, output_final_state=False, state_v_first=True, chunk_size=chunk_size,
        )
    return o.to(v.dtype)


@chunk_gated_delta_rule.register_fake
def _rule_fake(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
               chunk_size: int = 64) -> Tensor:
    _check_rule(q, k, v, g, beta, chunk_size)
    return v.new_empty(v.shape)


@torch.library.custom_op("neollm::chunk_gated_delta_rule_bwd", mutates_args=(), device_types="cpu")
def _rule_bwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, do: Tensor, scale: float,
              chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = lambda q_, k_, v_, g_, b_: _rule_ref(q_, k_, v_, g_, b_, scale, chunk_size)  # noqa: E731
    return _reference_grads(fn, (q, k, v, g, beta), do)


@_rule_bwd.register_kernel("cuda")
def _rule_bwd_cuda(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, do: Tensor, scale: float,
                   chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fla's ChunkGatedDeltaRuleFunction.backward (no state, gate/l2norm/sigmoid outside), A recomputed."""
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    fla_chunk = _fla_gdn()
    q, k, v, beta, do = (t.contiguous() for t in (q, k, v, beta, do))
    with torch.cuda.device(q.device):
        g_cum = chunk_local_cumsum(g.contiguous(), chunk_size=chunk_size, scale=RCP_LN2)
        _, _, A = chunk_gated_delta_rule_fwd_intra(k=k, v=v, g=g_cum, beta=beta, chunk_size=chunk_size)
        dq, dk, dv, db, dg, _, _, _ = fla_chunk.chunk_gated_delta_rule_bwd(
            q=q, k=k, v=v, g=g_cum, beta=beta, A=A, scale=scale, initial_state=None, do=do, dht=None,
            state_v_first=True, chunk_size=chunk_size,
        )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), db.to(beta.dtype)


@_rule_bwd.register_fake
def _rule_bwd_fake(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, do: Tensor, scale: float,
                   chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(t.new_empty(t.shape) for t in (q, k, v, g, beta))


def _rule_setup(ctx, inputs, output) -> None:
    q, k, v, g, beta, scale, chunk_size = inputs
    ctx.save_for_backward(q, k, v, g, beta)
    ctx.scale, ctx.chunk_size = scale, chunk_size


def _rule_backward(ctx, do: Tensor):
    q, k, v, g, beta = ctx.saved_tensors
    grads = _rule_bwd(q, k, v, g, beta, do, ctx.scale, ctx.chunk_size)
    return (*grads, None, None)


chunk_gated_delta_rule.register_autograd(_rule_backward, setup_context=_rule_setup)

GDN_OPS = (
    torch.ops.neollm.causal_conv1d_silu.default,
    torch.ops.neollm.chunk_gated_delta_rule.default,
)
"""The forward ops, for activation checkpointing's list of ops whose outputs are saved."""
