"""The attention epilogue (XSA, directional routing, output gate) as one custom op: a Triton kernel
forward and one backward, and the plain PyTorch reference they must match.

Per token and query head h (KV head j = h // g), on the kernel output ``y [d]`` in fp32
(neollm/model/attention.py has the papers and readings):

* XSA: ``a = <y, v> / (||v||^2 + eps)``, ``y1 = y - a v`` (v the token's own value of KV head j);
* routing: ``p_k = <y1, u_k>``, ``r_k = sigmoid(z_k)``, ``y2 = y1 - sum_k r_k p_k u_k`` (unit
  directions ``u [H, K, d]``, router logits ``z [..., H, K]`` with the router bias added);
* gate: ``out = y2 * sigmoid(g)``, g elementwise ``[..., H, d]`` or one per head ``[..., H]``.

Each step only when its input is given. Why a kernel: the unfused path casts y to fp32, runs XSA's two
row reductions, two block-diagonal GEMMs for the routing and the gate's multiply, each a pass over
[tokens, H * d] in HBM (fp32 in between), and autograd keeps those tensors. Here forward reads y, v, z
and g once and writes out; backward reads them and the upstream gradient once, recomputes the rest
and writes dy, dv, dz, dg and, per block of tokens, partial sums of du (summed in torch).

Backward per row (the projection ``I - sum_k r_k u_k u_k^T`` is symmetric): with ``dy2 = dout * s``
(s the gate), ``q_k = <dy2, u_k>``: ``dy1 = dy2 - sum_k r_k q_k u_k``, ``dz_k = -q_k p_k r_k (1 - r_k)``,
``du_k += -r_k (q_k y1 + p_k dy2)``; gate: ``dg = dout * y2 * s (1 - s)`` (headwise: summed over d);
XSA with ``c = <dy1, v>``, ``n = ||v||^2 + eps``: ``dy = dy1 - (c / n) v`` and
``dv += -a dy1 - c (y - 2 a v) / n`` summed over the KV group's query heads. ``backward_reference`` is
the same in PyTorch, checked against autograd in fp64 (tests/test_attention_epilogue.py).

Switch: ``EPILOGUE_IMPL`` (environment ``NEOLLM_EPILOGUE_IMPL``) = "auto" (default: the kernels
where they can run, on CUDA), "torch" (the unfused reference through autograd) or "triton" (the
kernels; CUDA, fp32/bf16/fp16; an error elsewhere). The default is "auto": neollm_135m's real trainer on an H100 ran 1.18x faster with the four
technique kernels (LUCID, PolyNorm GLU, q/k path, epilogue) than with the references, and 1.04x with
the three besides LUCID (BENCHMARKS.md, 2026-12-05).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from neollm.kernels.triton_support import KERNEL_IMPLS, resolve_impl, unavailable_reason
from neollm.precision import compute_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA torch builds
    triton = None


# ---- the reference ----------------------------------------------------------------------------
def grouped(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """``[B, T, H, d]`` -> ``[B, T, Hkv, g, d]`` (query head h = kv * g + i serves KV head kv)."""
    b, t, h, d = x.shape
    return x.view(b, t, n_kv_heads, h // n_kv_heads, d)


def exclusive(y: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """XSA (arXiv 2603.09078): ``z = y - <y, v> / (||v||^2 + eps) * v`` per head.

    ``y [B, T, H, d]`` attention output; ``v [B, T, Hkv, d]`` each token's own value; query head
    h uses the value of its KV head (GQA: h // g).
    """
    dt = compute_dtype(y)
    yg = grouped(y.to(dt), v.shape[2])          # [B, T, Hkv, g, d]
    vf = v.to(dt).unsqueeze(3)                  # [B, T, Hkv, 1, d]
    coef = (yg * vf).sum(-1, keepdim=True) / (vf.pow(2).sum(-1, keepdim=True) + eps)
    return (yg - coef * vf).flatten(2, 3).to(y.dtype)


def unit_directions(directions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Routing's ``u = U / ||U||`` ``[H, K, d]`` in ``like``'s compute dtype (autograd through it)."""
    return F.normalize(directions.to(compute_dtype(like)), dim=-1)


def directional_suppress(o: torch.Tensor, u: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """Directional routing (arXiv 2603.14923, our reading): per head,
    ``o' = o - sum_k r_k <o, u_k> u_k``.

    ``o [B, T, H, d]``; unit directions ``u [H, K, d]`` (``unit_directions``); ``route r [B, T, H, K]``
    in (0, 1).
    """
    dt = compute_dtype(o)
    b, t, h, d = o.shape
    k = u.shape[1]
    # Both sums as one aligned GEMM each against the block-diagonal [H*d, H*K] matrix of the
    # directions. Per head they would be GEMMs with a size of K (4), which cuBLAS runs on slow
    # unaligned kernels; as fused multiply + sum, inductor's reduction for the directions' gradient
    # over all tokens took over a quarter of a step (BENCHMARKS.md, fifth session, "Fix 1"). H x the FLOPs of the
    # per-head form, a negligible amount (2 * H * d * H * K per token). Under autocast the two GEMMs
    # run in bf16 with fp32 accumulation, like the projections; the subtraction stays in fp32.
    blocks = torch.block_diag(*u.to(dt).transpose(1, 2))                    # [H*d, H*K]
    flat = o.reshape(b * t, h * d).to(dt)
    coef = (flat @ blocks).view(b, t, h, k) * route.to(dt)                  # [B, T, H, K]
    correction = coef.reshape(b * t, h * k) @ blocks.t()
    return (flat - correction).view(b, t, h, d).to(o.dtype)


def output_gate(y: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Gated attention (arXiv 2505.06708, G1): ``y * sigmoid(g)``, g ``[B, T, H, d]`` or ``[B, T, H]``."""
    gate = torch.sigmoid(gate_logits)
    return y * (gate if gate.dim() == y.dim() else gate.unsqueeze(-1))


def epilogue_reference(y: torch.Tensor, v: torch.Tensor | None, u: torch.Tensor | None,
                       route_logits: torch.Tensor | None, gate_logits: torch.Tensor | None,
                       eps: float) -> torch.Tensor:
    """XSA (v given), routing (u and route_logits given), gate (gate_logits given) on ``y [B, T, H, d]``:
    the unfused path, in y's dtype between the steps, which the kernels must match."""
    if v is not None:
        y = exclusive(y, v, eps)
    if u is not None:
        y = directional_suppress(y, u, torch.sigmoid(route_logits))
    if gate_logits is not None:
        y = output_gate(y, gate_logits)
    return y


def backward_reference(y: torch.Tensor, v: torch.Tensor | None, u: torch.Tensor | None,
                       route_logits: torch.Tensor | None, gate_logits: torch.Tensor | None,
                       d_out: torch.Tensor, eps: float):
    """``(dy, dv, du, dz, dg)`` of the epilogue (None for an absent input), the backward the kernel
    implements (module docstring), in the compute dtype from start to end; du in the compute dtype."""
    dt = compute_dtype(y)
    b, t, h, d = y.shape
    yf, dout = y.to(dt), d_out.to(dt)
    hkv = v.shape[2] if v is not None else h
    if v is not None:
        vf = v.to(dt).unsqueeze(3)                                          # [B, T, Hkv, 1, d]
        norm = vf.pow(2).sum(-1, keepdim=True) + eps
        a = (grouped(yf, hkv) * vf).sum(-1, keepdim=True) / norm            # [B, T, Hkv, g, 1]
        y1 = (grouped(yf, hkv) - a * vf).flatten(2, 3)
    else:
        y1 = yf
    if u is not None:
        uf = u.to(dt)
        r = torch.sigmoid(route_logits.to(dt))                              # [B, T, H, K]
        p = torch.einsum("bthd,hkd->bthk", y1, uf)
        y2 = y1 - torch.einsum("bthk,hkd->bthd", r * p, uf)
    else:
        y2 = y1
    dg = None
    if gate_logits is not None:
        gl = gate_logits.to(dt)
        s = torch.sigmoid(gl if gl.dim() == 4 else gl.unsqueeze(-1))
        ds = dout * y2 * s * (1 - s)
        dg = (ds if gl.dim() == 4 else ds.sum(-1)).to(gate_logits.dtype)
        dy2 = dout * s
    else:
        dy2 = dout
    du = dz = None
    if u is not None:
        q = torch.einsum("bthd,hkd->bthk", dy2, uf)
        dy1 = dy2 - torch.einsum("bthk,hkd->bthd", r * q, uf)
        dz = (-q * p * r * (1 - r)).to(route_logits.dtype)
        du = -(torch.einsum("bthk,bthd->hkd", r * q, y1) + torch.einsum("bthk,bthd->hkd", r * p, dy2))
    else:
        dy1 = dy2
    dv = None
    if v is not None:
        dy1g = grouped(dy1, hkv)
        c = (dy1g * vf).sum(-1, keepdim=True)
        dy = (dy1g - c / norm * vf).flatten(2, 3)
        dv = (-a * dy1g - c * (grouped(yf, hkv) - 2 * a * vf) / norm).sum(3).to(v.dtype)
    else:
        dy = dy1
    return dy.to(y.dtype), dv, du, dz, dg


# ---- the kernels ------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _epilogue_forward_kernel(y_ptr, v_ptr, u_ptr, z_ptr, g_ptr, out_ptr, n_rows, eps,
                                 H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                                 XSA: tl.constexpr, ROUTING: tl.constexpr, GATE: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows [pid_n * BLOCK_N, ...) of the tokens, the query heads of KV head pid_j.
        GATE: 0 none, 1 elementwise, 2 one per head."""
        pid_n = tl.program_id(0)
        j = tl.program_id(1)
        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        ok = (rows < n_rows)[:, None] & (cols < D)[None, :]
        if XSA:
            v = tl.load(v_ptr + (rows * HKV + j)[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            norm = tl.sum(v * v, axis=1) + eps
        for i in tl.static_range(H // HKV):
            h = j * (H // HKV) + i
            offs = (rows * H + h)[:, None] * D + cols[None, :]
            y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if XSA:
                y = y - (tl.sum(y * v, axis=1) / norm)[:, None] * v
            if ROUTING:
                y_in = y
                for k in tl.static_range(K):
                    uk = tl.load(u_ptr + (h * K + k) * D + cols, mask=cols < D, other=0.0).to(tl.float32)
                    zk = tl.load(z_ptr + rows * (H * K) + h * K + k, mask=rows < n_rows, other=0.0).to(tl.float32)
                    y = y - (_sigmoid(zk) * tl.sum(y_in * uk[None, :], axis=1))[:, None] * uk[None, :]
            if GATE == 1:
                y = y * _sigmoid(tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32))
            if GATE == 2:
                gh = tl.load(g_ptr + rows * H + h, mask=rows < n_rows, other=0.0).to(tl.float32)
                y = y * _sigmoid(gh)[:, None]
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _epilogue_backward_kernel(y_ptr, v_ptr, u_ptr, z_ptr, g_ptr, dout_ptr, dy_ptr, dv_ptr, dz_ptr, dg_ptr, du_part_ptr,
                                  n_rows, eps, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                                  XSA: tl.constexpr, ROUTING: tl.constexpr, GATE: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """The same rows and heads: dy, dv (summed over the group), dz, dg, and this block's du partial
        sums ``du_part[pid_n, h, k, :]``."""
        pid_n = tl.program_id(0)
        j = tl.program_id(1)
        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & (cols < D)[None, :]
        if XSA:
            v_offs = (rows * HKV + j)[:, None] * D + cols[None, :]
            v = tl.load(v_ptr + v_offs, mask=ok, other=0.0).to(tl.float32)
            norm = tl.sum(v * v, axis=1) + eps
            dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for i in tl.static_range(H // HKV):
            h = j * (H // HKV) + i
            offs = (rows * H + h)[:, None] * D + cols[None, :]
            y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            dy2 = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            y1 = y
            if XSA:
                a = tl.sum(y * v, axis=1) / norm
                y1 = y - a[:, None] * v
            y2 = y1
            if ROUTING:
                for k in tl.static_range(K):
                    uk = tl.load(u_ptr + (h * K + k) * D + cols, mask=cols < D, other=0.0).to(tl.float32)
                    zk = tl.load(z_ptr + rows * (H * K) + h * K + k, mask=row_ok, other=0.0).to(tl.float32)
                    y2 = y2 - (_sigmoid(zk) * tl.sum(y1 * uk[None, :], axis=1))[:, None] * uk[None, :]
            if GATE == 1:
                s = _sigmoid(tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32))
                tl.store(dg_ptr + offs, (dy2 * y2 * s * (1.0 - s)).to(dg_ptr.dtype.element_ty), mask=ok)
                dy2 = dy2 * s
            if GATE == 2:
                sh = _sigmoid(tl.load(g_ptr + rows * H + h, mask=row_ok, other=0.0).to(tl.float32))
                dgh = tl.sum(dy2 * y2, axis=1) * sh * (1.0 - sh)
                tl.store(dg_ptr + rows * H + h, dgh.to(dg_ptr.dtype.element_ty), mask=row_ok)
                dy2 = dy2 * sh[:, None]
            dy1 = dy2
            if ROUTING:
                for k in tl.static_range(K):
                    uk = tl.load(u_ptr + (h * K + k) * D + cols, mask=cols < D, other=0.0).to(tl.float32)
                    zk = tl.load(z_ptr + rows * (H * K) + h * K + k, mask=row_ok, other=0.0).to(tl.float32)
                    rk = _sigmoid(zk)
                    pk = tl.sum(y1 * uk[None, :], axis=1)
                    qk = tl.sum(dy2 * uk[None, :], axis=1)
                    dy1 = dy1 - (rk * qk)[:, None] * uk[None, :]
                    tl.store(dz_ptr + rows * (H * K) + h * K + k,
                             (-qk * pk * rk * (1.0 - rk)).to(dz_ptr.dtype.element_ty), mask=row_ok)
                    duk = -tl.sum((rk * qk)[:, None] * y1 + (rk * pk)[:, None] * dy2, axis=0)
                    tl.store(du_part_ptr + ((pid_n * H + h) * K + k) * D + cols, duk, mask=cols < D)
            dy = dy1
            if XSA:
                c = tl.sum(dy1 * v, axis=1)
                dy = dy1 - (c / norm)[:, None] * v
                dv += -a[:, None] * dy1 - (c / norm)[:, None] * (y - 2.0 * a[:, None] * v)
            tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=ok)
        if XSA:
            tl.store(dv_ptr + v_offs, dv.to(dv_ptr.dtype.element_ty), mask=ok)


def kernel_unavailable_reason(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """Why the Triton kernels cannot serve tensors on ``device`` of these dtypes (None when they can)."""
    return unavailable_reason(device, dtypes)


BLOCK_N = 32  # tokens per program (x the KV group's heads, d 64): not yet tuned on a GPU
NUM_WARPS = 4  # not yet tuned either (tools/bench_epilogue.py --block-n --warps sweeps both)


def _gate_kind(gate_logits: torch.Tensor | None) -> int:
    return 0 if gate_logits is None else (1 if gate_logits.dim() == 4 else 2)


def _launch_args(y: torch.Tensor, v, u, z, g, eps: float):
    b, t, h, d = y.shape
    hkv = v.shape[2] if v is not None else h
    n = b * t
    grid = (triton.cdiv(n, BLOCK_N), hkv)
    meta = dict(H=h, HKV=hkv, D=d, K=u.shape[1] if u is not None else 1, XSA=v is not None,
                ROUTING=u is not None, GATE=_gate_kind(g), BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(d))
    return n, grid, meta


def _or(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """A pointer for an absent input (never read: its step is compiled out)."""
    return fallback if t is None else t.contiguous()


def forward_kernel(y, v, u, route_logits, gate_logits, eps: float) -> torch.Tensor:
    """The epilogue by the forward kernel, in y's dtype."""
    y = y.contiguous()
    out = torch.empty_like(y)
    n, grid, meta = _launch_args(y, v, u, route_logits, gate_logits, eps)
    if out.numel():
        _epilogue_forward_kernel[grid](y, _or(v, y), _or(u, y), _or(route_logits, y), _or(gate_logits, y), out, n, eps,
                                       num_warps=NUM_WARPS, **meta)
    return out


def backward_kernel(y, v, u, route_logits, gate_logits, d_out, eps: float):
    """``(dy, dv, du, dz, dg)`` by the backward kernel, as ``backward_reference`` (du fp32)."""
    y, d_out = y.contiguous(), d_out.contiguous()
    n, grid, meta = _launch_args(y, v, u, route_logits, gate_logits, eps)
    dy = torch.empty_like(y)
    dv = None if v is None else torch.empty_like(v.contiguous())
    dz = None if route_logits is None else torch.empty_like(route_logits.contiguous())
    dg = None if gate_logits is None else torch.empty_like(gate_logits.contiguous())
    # every (block, head, direction) row is written by its program: no zero fill needed
    parts = None if u is None else torch.empty(grid[0], *u.shape, device=y.device, dtype=torch.float32)
    if dy.numel():
        _epilogue_backward_kernel[grid](y, _or(v, y), _or(u, y), _or(route_logits, y), _or(gate_logits, y), d_out,
                                        dy, _or(dv, dy), _or(dz, dy), _or(dg, dy), _or(parts, dy), n, eps,
                                        num_warps=NUM_WARPS, **meta)
    du = None if u is None else parts.sum(0)
    return dy, dv, du, dz, dg


# ---- the op -----------------------------------------------------------------------------------
def _require_kernel(*tensors: torch.Tensor | None) -> None:
    present = [t for t in tensors if t is not None]
    reason = kernel_unavailable_reason(present[0].device, tuple(t.dtype for t in present))
    if reason is not None:
        raise RuntimeError(f"the attention epilogue's Triton kernel cannot run here: {reason}; "
                           f"use NEOLLM_EPILOGUE_IMPL 'torch' or 'auto'")


@torch.library.custom_op("neollm::attention_epilogue", mutates_args=())
def epilogue_op(y: torch.Tensor, v: torch.Tensor | None, u: torch.Tensor | None, route_logits: torch.Tensor | None,
                gate_logits: torch.Tensor | None, eps: float, use_kernel: bool) -> torch.Tensor:
    """The epilogue of ``y [B, T, H, d]`` in y's dtype (``epilogue_reference``'s inputs). ``use_kernel``:
    the Triton kernels (CUDA, or the CPU interpreter), else the reference."""
    with torch.autocast(y.device.type, enabled=False):
        if use_kernel:
            _require_kernel(y, v, u, route_logits, gate_logits)
            return forward_kernel(y, v, u, route_logits, gate_logits, eps)
        return epilogue_reference(y, v, u, route_logits, gate_logits, eps).contiguous()


@epilogue_op.register_fake
def _(y, v, u, route_logits, gate_logits, eps, use_kernel):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.custom_op("neollm::attention_epilogue_backward", mutates_args=())
def epilogue_backward(y: torch.Tensor, v: torch.Tensor | None, u: torch.Tensor | None,
                      route_logits: torch.Tensor | None, gate_logits: torch.Tensor | None, d_out: torch.Tensor,
                      eps: float, use_kernel: bool) -> list[torch.Tensor]:
    """``[dy, dv, du, dz, dg]`` for the inputs that are given, in that order (see ``backward_reference``)."""
    with torch.autocast(y.device.type, enabled=False):
        if use_kernel:
            _require_kernel(y, v, u, route_logits, gate_logits)
            grads = backward_kernel(y, v, u, route_logits, gate_logits, d_out, eps)
        else:
            grads = backward_reference(y, v, u, route_logits, gate_logits, d_out, eps)
    return [g.contiguous() for g in grads if g is not None]


@epilogue_backward.register_fake
def _(y, v, u, route_logits, gate_logits, d_out, eps, use_kernel):
    du_dtype = torch.float32 if use_kernel else compute_dtype(y)
    return [torch.empty_like(t, memory_format=torch.contiguous_format, dtype=dt)
            for t, dt in ((y, y.dtype), (v, None), (u, du_dtype), (route_logits, None), (gate_logits, None))
            if t is not None]


def _setup_context(ctx, inputs, output):
    y, v, u, route_logits, gate_logits, eps, use_kernel = inputs
    ctx.save_for_backward(y, v, u, route_logits, gate_logits)
    ctx.eps, ctx.use_kernel = eps, use_kernel


def _backward(ctx, d_out):
    saved = ctx.saved_tensors
    grads = iter(epilogue_backward(*saved, d_out.contiguous(), ctx.eps, ctx.use_kernel))
    dy, dv, du, dz, dg = (None if t is None else next(grads) for t in saved)
    du = None if du is None else du.to(saved[2].dtype)
    return dy, dv, du, dz, dg, None, None


epilogue_op.register_autograd(_backward, setup_context=_setup_context)

# On NeoLLM's selective-op activation-checkpointing save list (neollm/parallelize.py), as the PolyNorm GLU:
# its output is the output projection's input, which that matmul's backward reads.
EPILOGUE_OPS = (torch.ops.neollm.attention_epilogue.default,)


# ---- the switch -------------------------------------------------------------------------------
EPILOGUE_IMPLS = KERNEL_IMPLS
EPILOGUE_IMPL = os.environ.get("NEOLLM_EPILOGUE_IMPL", "auto")
"""Which path this op takes (module docstring): "auto" (the default: the Triton kernels on CUDA
where they can run, else the PyTorch reference), "torch" or "triton". Set here or for a whole run by
NEOLLM_EPILOGUE_IMPL; an unknown name is an error at the first call."""


def uses_kernel(impl: str, *tensors: torch.Tensor | None) -> bool:
    """Resolve ``impl`` (one of EPILOGUE_IMPLS) for these tensors: True for the Triton kernels."""
    present = [t for t in tensors if t is not None]
    reason = kernel_unavailable_reason(present[0].device, tuple(t.dtype for t in present))
    return resolve_impl(impl, reason, present[0].is_cuda,
                        "attention epilogue impl (attention_epilogue.EPILOGUE_IMPL, env NEOLLM_EPILOGUE_IMPL)",
                        "NEOLLM_EPILOGUE_IMPL")


def attention_epilogue(y: torch.Tensor, v: torch.Tensor | None, directions: torch.Tensor | None,
                       route_logits: torch.Tensor | None, gate_logits: torch.Tensor | None, eps: float,
                       impl: str | None = None) -> torch.Tensor:
    """XSA (v given), directional routing (raw ``directions [H, K, d]`` and router logits
    ``[B, T, H, K]`` given), output gate (gate logits given) on ``y [B, T, H, d]``: the fused op where
    ``impl`` (default ``EPILOGUE_IMPL``) resolves to the kernels, else the unfused reference."""
    u = None if directions is None else unit_directions(directions, y)
    if v is None and u is None and gate_logits is None:
        return y
    if uses_kernel(EPILOGUE_IMPL if impl is None else impl, y, v, u, route_logits, gate_logits):
        return epilogue_op(y, v, u, route_logits, gate_logits, eps, True)
    return epilogue_reference(y, v, u, route_logits, gate_logits, eps)
