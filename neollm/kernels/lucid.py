"""LUCID's solve ``X = P^-1 V`` as one custom op: blocked Triton kernels forward and backward, and
the plain PyTorch reference they must match.

Per (batch, KV head), with RMS-normalised keys ``kr [T, d]`` (the normalisation stays in PyTorch
around the op) and ``S = kr kr^T / sqrt(d) - sqrt(d)``: ``P = I + strict_tril(exp(S))``. The
diagonal of ``exp(S)`` is 1 up to the RMS eps; the reference's solve (``unitriangular=True``)
takes it as exactly 1, and so do the kernels, so it gets no gradient.

Why a kernel: the reference forms P ([T x T] fp32) in HBM and calls cuBLAS's trsm, forward and
again in backward: the largest technique cost of a `neollm_135m` step (BENCHMARKS.md). The kernels
never write P: each tile of ``exp(S)`` is formed from two key tiles where it is used.

* forward (``_substitute_kernel``): block forward substitution over row blocks of ``BR`` rows,
  ``X_i = D_i^-1 (V_i - sum_{j<i} P_ij X_j)``, one program per (batch, head, block of value
  columns): the columns of X are independent solves.
* backward, ``dV = P^-T dX``: the same kernel transposed: block back substitution from the last
  block, with ``(P^T)_ij = exp(S_ij)`` for ``j > i`` (S is symmetric, so no transpose is formed), and
  the forward's diagonal inverses (an op output kept for backward, 16 MiB a layer at neollm_135m's
  64 x 512: ``(P^T)_ii^-1 = (P_ii^-1)^T``), not computed again.
* ``SOLVE = "lookback"`` (``NEOLLM_LUCID_SOLVE``; chosen by the default "auto" when the walks would not
  fill the GPU; ``_lookback_kernel``): both substitutions with one program per row block instead of one
  walk per head; a block subtracts each earlier block's
  ``P_ij X_j`` as soon as that block's program publishes ``X_j`` (a flag per block, acquire/release),
  so a head's blocks overlap: at micro-batch 8 the walk has only 32 programs for an H100's 132 SMs.
* backward, ``dkr = (dS + dS^T) kr / sqrt(d)`` with ``dS = -(dV X^T) * P`` on the strict lower
  triangle (``_key_grad_kernel``, one program per (batch, head, row block), no atomics; its own, larger
  tiles: KEY_GRAD_*).

The diagonal block ``D_i = I + N`` (``N`` strictly lower) is applied as ``D_i^-1``, which
``_diagonal_inverse_kernel`` computes for all blocks in parallel first (``DIAGONAL = "inverse"``, the
default, ``NEOLLM_LUCID_DIAGONAL``) by recursive doubling (``_doubling_inverse``: log2(BR) levels of two
tensor-core products; until the twenty-first session by BR sequential rank-1 updates, the same
error), or with "substitute" solved in registers by column-wise substitution (``BR`` rank-1 updates)
inside the walk.
The repeated-squaring product form ``(I+N)^-1 = (I-N)(I+N^2)(I+N^4)...`` is not used: with correlated
keys (entries of N near 1) the powers of N grow like binomial coefficients and cancel: in fp32 its
relative error against fp64 was 10 (noise 0.3) to 1e9 (noise 0.1), where substitution's was below 6e-7
(BR = 64, d = 64, keys = a shared direction + noise; the solution itself stays the size of V).

Precision: by default every ``tl.dot`` is "tf32x3" (``DOT_PRECISION``, below: measured on an H100 as
accurate as IEEE fp32 and 2.7x faster); the reasoning that first chose ``input_precision="ieee"``: The reference with bf16
inputs is fp32 math on those inputs, and a bf16 result is that rounded once. TF32 (inputs rounded
to 11 bits) was weighed in a CPU emulation of the blocked solve (T 512, d 64, 32-row blocks, bf16
values; relative error of X against fp64, worst of 3 draws): with correlated keys (a shared
direction + 0.05-0.2 noise) IEEE 2e-5, TF32 in the Gram 8e-4, TF32 in the solve's products
``P_ij X_j`` 3e-3, against 1.7e-3 for rounding X to bf16; with independent keys 4e-8 / 5e-6 / 4e-6.
So TF32 in the solve would double a bf16 run's error and the TF32 Gram add half of it, and both are
40-150x the fp32 reference's error on fp32 runs: neither is the default. ``dots`` (``DOT_PRECISION``)
also offers "tf32" for every product and "tf32x3" (each fp32 operand split into two TF32 parts,
three tensor-core products, fp32 accumulation), for tools/bench_attention.py and tests/gpu to
measure on the GPU. The same CPU emulation for the Gram (T 512, d 64, batch 4, worst of 3 draws,
relative error of X against fp64): tf32x3 equals IEEE's error (correlated keys with 0.05 / 0.1 /
0.2 noise: 1.9e-5 / 1.7e-5 / 1.3e-5 both; independent: 3.8e-7 both), where plain TF32 gives 7e-4
to 8e-4 and 1.2e-4.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from neollm.errors import ConfigError
from neollm.kernels.triton_support import unavailable_reason

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA torch builds
    triton = None

# Launch configuration: rows per block (the diagonal solve's size: a sequential step per row, on
# [BLOCK_ROWS x d / VALUE_SPLIT] tiles), the column chunk of the off-diagonal products, warps, and
# programs per (batch, head) in the substitutions, each solving d / VALUE_SPLIT columns (256
# programs at 64 x 4 heads would fill an H100's 132 SMs only twice). From tools/bench_attention.py
# --lucid-op-only's sweep on an H100 (B 64, Hkv 4, T 512, d 64; BENCHMARKS.md 2026-12-05): 32 / 64 /
# 4 warps / one program per head took 0.61 + 1.51 ms forward + backward in tf32x3 products (IEEE 1.01
# + 3.91), against 1.51 + 2.39 (IEEE 1.80 + 4.70) for two programs per head, the earlier untimed
# default; the best in tf32x3, 16 / 32 / 2 warps / 2 programs, took 0.54 + 1.40 but 1.71 + 4.66 in IEEE.
BLOCK_ROWS = 32
BLOCK_COLS = 64
NUM_WARPS = 4
VALUE_SPLIT = 1

# The key gradient's launch, apart from the substitutions': its programs (one per (batch, head, row block))
# are independent, with no walk from block to block whose latency bounds the tile size, so larger tiles pay.
# tools/bench_attention.py --lucid-key-grad-only on an H100 (Hkv 4, T 512, d 64, tf32x3; BENCHMARKS.md
# 2026-12-07): 128 rows / 64 columns / 8 warps / Triton's default 3 stages took 0.62 ms a call at batch 64
# (0.68x the substitutions' 32 / 64 / 4: 0.91), 0.158 ms at 16 (0.71x) and 0.082 at 8 (0.72x): the best of
# the sweep at each batch, the same dK error (8.7e-6 against fp64).
KEY_GRAD_ROWS = 128
KEY_GRAD_COLS = 64
KEY_GRAD_WARPS = 8
KEY_GRAD_STAGES: int | None = None


# ---- the reference --------------------------------------------------------------------------
def preconditioner(kr: torch.Tensor) -> torch.Tensor:
    """``tril(exp(kr kr^T / sqrt(d) - sqrt(d)))`` of RMS-normalised keys ``kr [..., T, d]``."""
    d = kr.shape[-1]
    return torch.exp(kr @ kr.mT / math.sqrt(d) - math.sqrt(d)).tril()


def solve_reference(kr: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``X = P^-1 V`` in kr's dtype (the compute dtype). Solved as ``X^T = V^T P^-T`` so that the
    solver's column-major result is X row-major (the layout SDPA's fused kernels need)."""
    p = preconditioner(kr)
    return torch.linalg.solve_triangular(p.mT, v.to(p.dtype).mT, upper=True, left=False,
                                         unitriangular=True).mT


def solve_backward_reference(kr: torch.Tensor, x: torch.Tensor,
                             dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dkr, dv)`` of ``X = P^-1 V`` given ``X`` and ``dX``, P rebuilt from the keys:
    ``dV = P^-T dX``, ``dS = -(dV X^T) * P`` strictly below the diagonal (the unit diagonal is a
    constant), ``dkr = (dS + dS^T) kr / sqrt(d)``."""
    p = preconditioner(kr)
    dv = torch.linalg.solve_triangular(p.mT, dx.to(p.dtype), upper=True, unitriangular=True)
    ds = (-(dv @ x.to(p.dtype).mT) * p).tril(-1)
    dkr = (ds + ds.mT) @ kr / math.sqrt(kr.shape[-1])
    return dkr, dv


# ---- the kernels ------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _exp_gram(k_rows, k_cols, scale, shift, DOTS: tl.constexpr):
        """``exp(k_rows k_cols^T * scale - shift)``, fp32."""
        s = tl.dot(k_rows, tl.trans(k_cols), input_precision=DOTS)
        return tl.exp(s * scale - shift)

    @triton.jit
    def _diagonal_solve(k_r, r_ok, rhs, rr, scale, shift, DOTS: tl.constexpr, BR: tl.constexpr,
                        TRANSPOSED: tl.constexpr):
        """``D^-1 rhs`` (``D^-T rhs`` if TRANSPOSED) for the diagonal block ``D = I + N`` of the rows
        ``k_r`` (N strictly lower; upper when transposed): column-wise substitution, BR rank-1 updates."""
        e = _exp_gram(k_r, k_r, scale, shift, DOTS)
        if TRANSPOSED:
            inside = rr[:, None] < rr[None, :]
        else:
            inside = rr[:, None] > rr[None, :]
        n = tl.where(inside & r_ok[:, None] & r_ok[None, :], e, 0.0)
        for i in range(0, BR):
            if TRANSPOSED:
                c = BR - 1 - i
            else:
                c = i
            x_row = tl.sum(tl.where(rr[:, None] == c, rhs, 0.0), axis=0)    # solved row c
            n_col = tl.sum(tl.where(rr[None, :] == c, n, 0.0), axis=1)      # column c of N
            rhs -= n_col[:, None] * x_row[None, :]
        return rhs

    @triton.jit
    def _doubling_inverse(k_r, r_ok, rr, scale, shift, DOTS: tl.constexpr, LEVELS: tl.constexpr):
        """``D^-1`` of the diagonal block ``D = I + N`` (N strictly lower) of the rows ``k_r``, by recursive
        doubling on tensor cores: ``M`` holds the inverses of D's diagonal sub-blocks of size s (at first
        1: the identity); for each block of size 2s = [[A, 0], [C, B]], ``M - M C M`` puts
        ``-B^-1 C A^-1`` below ``diag(A^-1, B^-1)``: its inverse. ``LEVELS`` = log2(BR) levels of two
        products each, where the substitution (``_diagonal_solve``) makes BR sequential rank-1 updates.
        Every M is an exact sub-block inverse (no cancelling powers of N, unlike the product form):
        in fp32 its error against fp64 was within 1.3x the substitution's (BR 32 and 64, d 64, keys a
        shared direction + 0.05 to 10 noise: 1e-7 to 5e-10). Its products take ``DOTS`` as every other
        product here: with the opt-in "tf32" the inverse too is TF32 (the rank-1 updates were fp32 FMAs)."""
        e = _exp_gram(k_r, k_r, scale, shift, DOTS)  # each level below takes only its strictly lower part
        n = tl.where(r_ok[:, None] & r_ok[None, :], e, 0.0)
        inv = tl.where(rr[:, None] == rr[None, :], 1.0, 0.0)
        for level in tl.static_range(0, LEVELS):
            size = 2 << level  # the blocks joined at this level; their halves are inverted already
            same_block = (rr[:, None] // size) == (rr[None, :] // size)
            second_half = (rr % size) >= (size // 2)
            coupling = tl.where(same_block & second_half[:, None] & ~second_half[None, :], n, 0.0)
            inv = inv - tl.dot(tl.dot(inv, coupling, input_precision=DOTS), inv, input_precision=DOTS)
        return inv

    @triton.jit
    def _diagonal_inverse_kernel(k_ptr, k_sb, k_sh, k_st, dinv_ptr, n_heads, seq_len, head_dim, scale, shift,
                                 DOTS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, LEVELS: tl.constexpr):
        """One (batch, head, row block i): ``D_i^-1`` of the diagonal block ``D_i = I + N`` (N strictly
        lower) by recursive doubling (``_doubling_inverse``), for every block at once.
        ``dinv``: contiguous fp32 ``[B*H, n_blocks, BR, BR]``; padded rows get identity rows."""
        pid = tl.program_id(0)
        blk = tl.program_id(1)
        batch, head = pid // n_heads, pid % n_heads
        k_base = k_ptr + batch.to(tl.int64) * k_sb + head.to(tl.int64) * k_sh
        rr = tl.arange(0, BR)
        dd = tl.arange(0, BD)
        rows = blk * BR + rr
        r_ok = rows < seq_len
        k_r = tl.load(k_base + rows[:, None] * k_st + dd[None, :], mask=r_ok[:, None] & (dd < head_dim)[None, :],
                      other=0.0).to(tl.float32)
        inv = _doubling_inverse(k_r, r_ok, rr, scale, shift, DOTS, LEVELS)
        out = dinv_ptr + (pid.to(tl.int64) * tl.num_programs(1) + blk) * BR * BR
        tl.store(out + rr[:, None] * BR + rr[None, :], inv)

    @triton.jit
    def _substitute_kernel(k_ptr, k_sb, k_sh, k_st, b_ptr, b_sb, b_sh, b_st, out_ptr, dinv_ptr, n_heads, seq_len,
                           head_dim, scale, shift, TRANSPOSED: tl.constexpr, DOTS: tl.constexpr,
                           BR: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                           INVERSE: tl.constexpr):
        """One (batch, head) and BV of the d value columns (the columns of X are independent
        solves; the programs of one head share only the keys): ``out = P^-1 b`` (forward
        substitution), or with TRANSPOSED ``out = P^-T b`` (back substitution from the last
        block). ``out`` is a contiguous fp32 ``[B*H, T, d]`` buffer that later row blocks read back.
        With INVERSE the diagonal step is one product with ``_diagonal_inverse_kernel``'s ``D_i^-1``
        (its transpose when TRANSPOSED) instead of BR sequential rank-1 updates."""
        pid = tl.program_id(0)
        vv = tl.program_id(1) * BV + tl.arange(0, BV)
        v_ok = vv < head_dim
        batch, head = pid // n_heads, pid % n_heads
        k_base = k_ptr + batch.to(tl.int64) * k_sb + head.to(tl.int64) * k_sh
        b_base = b_ptr + batch.to(tl.int64) * b_sb + head.to(tl.int64) * b_sh
        out_base = out_ptr + pid.to(tl.int64) * seq_len * head_dim
        rr = tl.arange(0, BR)
        cc = tl.arange(0, BC)
        dd = tl.arange(0, BD)
        d_ok = dd < head_dim
        n_blocks = tl.cdiv(seq_len, BR)
        for step in range(0, n_blocks):
            if TRANSPOSED:
                r0 = (n_blocks - 1 - step) * BR
            else:
                r0 = step * BR
            rows = r0 + rr
            r_ok = rows < seq_len
            rd_ok = r_ok[:, None] & d_ok[None, :]
            rv_ok = r_ok[:, None] & v_ok[None, :]
            k_r = tl.load(k_base + rows[:, None] * k_st + dd[None, :], mask=rd_ok, other=0.0).to(tl.float32)
            acc = tl.load(b_base + rows[:, None] * b_st + vv[None, :], mask=rv_ok, other=0.0).to(tl.float32)
            # off-diagonal blocks: the solved rows before (after, transposed) this block
            if TRANSPOSED:
                c_start = r0 + BR
                c_end = seq_len
            else:
                c_start = 0
                c_end = r0
            for c0 in range(c_start, c_end, BC):
                cols = c0 + cc
                c_ok = cols < c_end
                cd_ok = c_ok[:, None] & d_ok[None, :]
                k_c = tl.load(k_base + cols[:, None] * k_st + dd[None, :], mask=cd_ok, other=0.0).to(tl.float32)
                e = tl.where(c_ok[None, :], _exp_gram(k_r, k_c, scale, shift, DOTS), 0.0)
                x_c = tl.load(out_base + cols[:, None] * head_dim + vv[None, :],
                              mask=c_ok[:, None] & v_ok[None, :], other=0.0, cache_modifier=".cg")
                acc -= tl.dot(e, x_c, input_precision=DOTS)
            if INVERSE:  # diagonal block: X_i = D_i^-1 acc (P^T's block is D_i^T: its inverse D_i^-T)
                dinv = tl.load(dinv_ptr + (pid.to(tl.int64) * n_blocks + r0 // BR) * BR * BR
                               + rr[:, None] * BR + rr[None, :])
                if TRANSPOSED:
                    dinv = tl.trans(dinv)
                acc = tl.dot(dinv, acc, input_precision=DOTS)
            else:  # diagonal block I + N, N strictly lower (upper, transposed)
                acc = _diagonal_solve(k_r, r_ok, acc, rr, scale, shift, DOTS, BR, TRANSPOSED)
            tl.store(out_base + rows[:, None] * head_dim + vv[None, :], acc, mask=rv_ok)
            tl.debug_barrier()  # the next row block reads these rows back

    @triton.jit
    def _lookback_kernel(k_ptr, k_sb, k_sh, k_st, b_ptr, b_sb, b_sh, b_st, out_ptr, dinv_ptr, flag_ptr, ticket_ptr,
                         n_heads, n_bh, seq_len, head_dim, scale, shift, max_spin, TRANSPOSED: tl.constexpr,
                         DOTS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
        """One row block i of one (batch, head), all d columns: ``X_i = D_i^-1 (b_i - sum_j P_ij X_j)``
        over the blocks j solved before it (j < i; j > i with TRANSPOSED, ``P^-T``), each taken as soon
        as its program has published it (one flag per block), so the blocks of a head overlap instead of
        one program walking them all. A program takes its (block, head) from a ticket counter, in order
        of block then head: every block it waits on belongs to a program that took its ticket earlier,
        is running or done, and needs nothing later, so no start order of the hardware can deadlock.
        A wait past ``max_spin`` polls (a scheduling fault) gives NaN rows, which the trainer's loss
        guard stops on, instead of a hung GPU. ``flag``/``ticket``: zeroed int32 (B*H*n_blocks, 1)."""
        ticket = tl.atomic_add(ticket_ptr, 1)
        step = ticket // n_bh
        pid = ticket % n_bh
        n_blocks = tl.cdiv(seq_len, BR)
        if TRANSPOSED:
            blk = n_blocks - 1 - step
        else:
            blk = step
        batch, head = pid // n_heads, pid % n_heads
        k_base = k_ptr + batch.to(tl.int64) * k_sb + head.to(tl.int64) * k_sh
        b_base = b_ptr + batch.to(tl.int64) * b_sb + head.to(tl.int64) * b_sh
        out_base = out_ptr + pid.to(tl.int64) * seq_len * head_dim
        flags = flag_ptr + pid.to(tl.int64) * n_blocks
        rr = tl.arange(0, BR)
        dd = tl.arange(0, BD)
        d_ok = dd < head_dim
        rows = blk * BR + rr
        r_ok = rows < seq_len
        rd_ok = r_ok[:, None] & d_ok[None, :]
        k_r = tl.load(k_base + rows[:, None] * k_st + dd[None, :], mask=rd_ok, other=0.0).to(tl.float32)
        acc = tl.load(b_base + rows[:, None] * b_st + dd[None, :], mask=rd_ok, other=0.0).to(tl.float32)
        stalled = 0
        for s in range(0, step):  # the blocks solved before this one, in the order they finish
            if TRANSPOSED:
                j = n_blocks - 1 - s
            else:
                j = s
            ready = tl.atomic_add(flags + j, 0, sem="acquire")
            spins = 0
            while (ready == 0) & (spins < max_spin):
                ready = tl.atomic_add(flags + j, 0, sem="acquire")
                spins += 1
            stalled = tl.maximum(stalled, (ready == 0).to(tl.int32))
            cols = j * BR + rr
            c_ok = cols < seq_len
            cd_ok = c_ok[:, None] & d_ok[None, :]
            k_c = tl.load(k_base + cols[:, None] * k_st + dd[None, :], mask=cd_ok, other=0.0).to(tl.float32)
            e = tl.where(c_ok[None, :], _exp_gram(k_r, k_c, scale, shift, DOTS), 0.0)
            x_c = tl.load(out_base + cols[:, None] * head_dim + dd[None, :], mask=cd_ok, other=0.0,
                          cache_modifier=".cg")
            acc -= tl.dot(e, x_c, input_precision=DOTS)
        dinv = tl.load(dinv_ptr + (pid.to(tl.int64) * n_blocks + blk) * BR * BR + rr[:, None] * BR + rr[None, :])
        if TRANSPOSED:
            dinv = tl.trans(dinv)
        acc = tl.dot(dinv, acc, input_precision=DOTS)
        acc = tl.where(stalled != 0, float("nan"), acc)
        tl.store(out_base + rows[:, None] * head_dim + dd[None, :], acc, mask=rd_ok)
        tl.debug_barrier()  # every thread's rows stored before the flag says so (Triton 3.6 adds no barrier itself)
        tl.atomic_xchg(flags + blk, 1, sem="release")

    @triton.jit
    def _key_grad_kernel(k_ptr, k_sb, k_sh, k_st, x_ptr, dv_ptr, dk_ptr, n_heads, seq_len, head_dim,
                         scale, shift, DOTS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
        """One (batch, head, row block i): ``dkr_i = scale * sum_j (dS_ij + dS_ji) kr_j`` with
        ``dS_ij = -(dV_i . X_j) exp(S_ij)`` for j < i. x, dv, dk: contiguous fp32 [B*H, T, d]."""
        pid = tl.program_id(0)
        r0 = tl.program_id(1) * BR
        batch, head = pid // n_heads, pid % n_heads
        k_base = k_ptr + batch.to(tl.int64) * k_sb + head.to(tl.int64) * k_sh
        off = pid.to(tl.int64) * seq_len * head_dim
        rows = r0 + tl.arange(0, BR)
        cc = tl.arange(0, BC)
        dd = tl.arange(0, BD)
        d_ok = dd < head_dim
        r_ok = rows < seq_len
        rd_ok = r_ok[:, None] & d_ok[None, :]
        k_r = tl.load(k_base + rows[:, None] * k_st + dd[None, :], mask=rd_ok, other=0.0).to(tl.float32)
        x_r = tl.load(x_ptr + off + rows[:, None] * head_dim + dd[None, :], mask=rd_ok, other=0.0)
        dv_r = tl.load(dv_ptr + off + rows[:, None] * head_dim + dd[None, :], mask=rd_ok, other=0.0)
        acc = tl.zeros((BR, BD), dtype=tl.float32)
        # dS_ij, j < i: the keys before each row
        for c0 in range(0, r0 + BR, BC):
            cols = c0 + cc
            c_ok = cols < seq_len
            cd_ok = c_ok[:, None] & d_ok[None, :]
            k_c = tl.load(k_base + cols[:, None] * k_st + dd[None, :], mask=cd_ok, other=0.0).to(tl.float32)
            x_c = tl.load(x_ptr + off + cols[:, None] * head_dim + dd[None, :], mask=cd_ok, other=0.0)
            ds = -tl.dot(dv_r, tl.trans(x_c), input_precision=DOTS) * _exp_gram(k_r, k_c, scale, shift, DOTS)
            ds = tl.where((cols[None, :] < rows[:, None]) & c_ok[None, :], ds, 0.0)
            acc += tl.dot(ds, k_c, input_precision=DOTS)
        # dS_ji, j > i: the keys after each row
        for c0 in range((r0 // BC) * BC, seq_len, BC):
            cols = c0 + cc
            c_ok = cols < seq_len
            cd_ok = c_ok[:, None] & d_ok[None, :]
            k_c = tl.load(k_base + cols[:, None] * k_st + dd[None, :], mask=cd_ok, other=0.0).to(tl.float32)
            dv_c = tl.load(dv_ptr + off + cols[:, None] * head_dim + dd[None, :], mask=cd_ok, other=0.0)
            ds_t = -tl.dot(x_r, tl.trans(dv_c), input_precision=DOTS) * _exp_gram(k_r, k_c, scale, shift, DOTS)
            ds_t = tl.where((cols[None, :] > rows[:, None]) & c_ok[None, :], ds_t, 0.0)
            acc += tl.dot(ds_t, k_c, input_precision=DOTS)
        tl.store(dk_ptr + off + rows[:, None] * head_dim + dd[None, :], acc * scale, mask=rd_ok)


def kernel_unavailable_reason(device: torch.device, dtypes: tuple[torch.dtype, ...], head_dim: int) -> str | None:
    """Why the Triton kernels cannot serve tensors on ``device`` of these dtypes (None when they can)."""
    reason = unavailable_reason(device, dtypes)
    if reason is not None:
        return reason
    if head_dim > 256:
        return f"head dim {head_dim} > 256"
    return None


def _head_strides(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t [B, H, T, d]`` with unit stride over d (copied otherwise) and its (b, h, t) strides."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(2))


DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
DOT_PRECISION = os.environ.get("NEOLLM_LUCID_DOTS", "tf32x3")
"""The kernels' matrix products (Gram tiles, the solve's off-diagonal products, the key gradient):
"tf32x3" (the default: three TF32 tensor-core products per fp32 one), "ieee" (fp32 FMA) or "tf32".
On an H100 (tools/bench_attention.py --lucid-op-only, T 512, d 64, fp32 keys, 2026-12-05) tf32x3 took
0.60 + 1.57 ms forward + backward against IEEE's 1.50 + 5.91, with a smaller error against fp64
(X 5.7e-6, dK 8.7e-6; IEEE 1.3e-5, 1.8e-5); plain TF32 was 5.7e-3 / 1.2e-2. Environment variable
``NEOLLM_LUCID_DOTS`` sets it for a whole run (the trainer's ranks included)."""


DIAGONALS = ("substitute", "inverse")
DIAGONAL = os.environ.get("NEOLLM_LUCID_DIAGONAL", "inverse")
"""The substitutions' diagonal step: "inverse" (the default: ``_diagonal_inverse_kernel`` first inverts
every diagonal block, all blocks of all heads in parallel, and the walk applies each as one product) or
"substitute" (each row block's ``D_i = I + N`` solved in the one program that walks the head's blocks, BR
sequential rank-1 updates per block). On an H100 (tools/bench_attention.py --lucid-op-only, T 512, d 64,
4 KV heads, rows 32, tf32x3; BENCHMARKS.md 2026-12-06 fifteenth session) "inverse" took 0.479 + 1.352 ms
forward + backward at batch 64 against 0.615 + 1.490, and 0.209 + 0.310 against 0.377 + 0.495 at batch 8,
with the same error against fp64 (X 5.7e-6, dK 8.7e-6). The backward's transposed solve reuses the
forward's inverses (an op output kept for backward, 16 MiB a layer at 64 x 512, rows 32; until the
twenty-fourth session it inverted the blocks again). Those timings are of the inverses by BR rank-1
updates; since the twenty-first session they come by recursive doubling on tensor cores
(``_doubling_inverse``): in tools/bench.py's profile of neollm_135m at 64 x 512 on an H100 (2026-12-08) they
took 2.1 ms of a step's 97 ms of kernels, 12 launches (24, 4.2 ms, before the backward reused them).
``NEOLLM_LUCID_DIAGONAL`` sets it for a run."""


SOLVES = ("auto", "walk", "lookback")
SOLVE = os.environ.get("NEOLLM_LUCID_SOLVE", "auto")
"""How the substitutions run: "walk" (one program per (batch, head) walks its row blocks one after
another, ``_substitute_kernel``), "lookback" (one program per row block, ``_lookback_kernel``: a block
starts on the blocks before it as they are published, so a head's blocks overlap; needs ``DIAGONAL``
"inverse") or "auto" (the default): "lookback" when the walk would have no more programs than the GPU
has SMs, else "walk". On an H100 (132 SMs; tools/bench_attention.py --lucid-op-only, T 512, d 64, 4 KV
heads, rows 32, tf32x3; BENCHMARKS.md, seventeenth session) lookback against walk, forward + backward:
0.093 + 0.200 ms vs 0.211 + 0.314 at batch 8 (32 walks), 0.136 + 0.354 vs 0.228 + 0.439 at 16 (64),
0.254 + 0.689 vs 0.289 + 0.708 at 32 (128), but 0.531 + 1.420 vs 0.478 + 1.350 at 64 (256 walks, where
the walk already fills the GPU). In the trainer at micro-batch 8 (CUDA graphs) lookback gave 190.4k tok/s
against 169.2k. ``NEOLLM_LUCID_SOLVE`` sets it for a run."""

MAX_SPIN = 1 if os.environ.get("TRITON_INTERPRET") == "1" else 1 << 24
"""Polls of one block's flag before ``_lookback_kernel`` gives up on it (NaN rows): far above any real wait
on a GPU; one under Triton's CPU interpreter, which runs the programs one after another, so a flag not
set when a program looks never will be."""


def _solve(solve: str | None, inverse: bool, walks: int = 0, device: torch.device | None = None) -> bool:
    """Whether to run the look-back solve; "auto" picks it when the ``walks`` programs of the walk would
    not fill the SMs of ``device`` (a CUDA device; elsewhere, e.g. Triton's interpreter, the walk)."""
    solve = check_solve(SOLVE if solve is None else solve, inverse)
    if solve == "auto":
        return (inverse and device is not None and device.type == "cuda"
                and walks <= torch.cuda.get_device_properties(device).multi_processor_count)
    return solve == "lookback"


def check_solve(solve: str, inverse: bool) -> str:
    """``solve`` if it names a solve that runs with this diagonal step, else a ConfigError saying what to set."""
    if solve not in SOLVES:
        raise ConfigError(f"LUCID's solve (lucid.SOLVE, environment variable NEOLLM_LUCID_SOLVE) must be one of "
                          f"{SOLVES}, got {solve!r}")
    if solve == "lookback" and not inverse:
        raise ConfigError("LUCID's 'lookback' solve applies inverted diagonal blocks: set NEOLLM_LUCID_DIAGONAL="
                          "inverse (or NEOLLM_LUCID_SOLVE=walk for the substitution diagonal step)")
    return solve


def _dots(dots: str | None) -> str:
    dots = DOT_PRECISION if dots is None else dots
    if dots not in DOT_PRECISIONS:
        raise ConfigError(f"LUCID's dot precision (lucid.DOT_PRECISION, environment variable NEOLLM_LUCID_DOTS) "
                          f"must be one of {DOT_PRECISIONS}, got {dots!r}")
    return dots


def _tile(name: str, size: int) -> int:
    if size < 16 or size & (size - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's smallest tile), got {size}")
    return size


def _launch_config(block_rows: int | None, block_cols: int | None, num_warps: int | None, d: int):
    br, bc = _tile("block_rows", block_rows or BLOCK_ROWS), _tile("block_cols", block_cols or BLOCK_COLS)
    return br, bc, max(16, triton.next_power_of_2(d)), num_warps or NUM_WARPS


def _key_grad_launch(block_rows: int | None, block_cols: int | None, num_warps: int | None,
                     num_stages: int | None) -> dict:
    """``_key_grad_kernel``'s tiles and launch options, each unset one from KEY_GRAD_*; ``num_stages`` is
    passed only when set, so that the default is Triton's own."""
    warps = KEY_GRAD_WARPS if num_warps is None else num_warps
    stages = KEY_GRAD_STAGES if num_stages is None else num_stages
    if warps < 1 or warps & (warps - 1):
        raise ValueError(f"num_warps must be a power of two, got {warps}")
    if stages is not None and stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {stages}")
    launch = dict(BR=_tile("block_rows", KEY_GRAD_ROWS if block_rows is None else block_rows),
                  BC=_tile("block_cols", KEY_GRAD_COLS if block_cols is None else block_cols), num_warps=warps)
    return launch if stages is None else dict(launch, num_stages=stages)


def _value_block(value_split: int | None, bd: int) -> int:
    split = value_split or max(1, min(VALUE_SPLIT, bd // 16))  # the default: at most what d allows
    if split < 1 or split & (split - 1) or bd // split < 16:
        raise ValueError(f"value_split must be a power of two leaving >= 16 columns per program, got {split}")
    return bd // split


def _diagonal(diagonal: str | None) -> bool:
    diagonal = DIAGONAL if diagonal is None else diagonal
    if diagonal not in DIAGONALS:
        raise ConfigError(f"LUCID's diagonal step (lucid.DIAGONAL, environment variable NEOLLM_LUCID_DIAGONAL) "
                          f"must be one of {DIAGONALS}, got {diagonal!r}")
    return diagonal == "inverse"


def inverses_shape(b: int, h: int, t: int, block_rows: int) -> tuple[int, int, int, int]:
    """``diagonal_inverses``' shape: ``[B*H, n_blocks, BR, BR]``."""
    return b * h, -(-t // block_rows), block_rows, block_rows


def diagonal_inverses(kr: torch.Tensor, *, dots: str | None = None, block_rows: int | None = None,
                      num_warps: int | None = None) -> torch.Tensor:
    """``D_i^-1`` of every diagonal block of P for ``kr [B, H, T, d]``: fp32 ``[B*H, n_blocks, BR, BR]``."""
    b, h, t, d = kr.shape
    br, _, bd, warps = _launch_config(block_rows, None, num_warps, d)
    kr, ks = _head_strides(kr)
    dinv = torch.empty(inverses_shape(b, h, t, br), device=kr.device, dtype=torch.float32)
    n_blocks = dinv.shape[1]
    if dinv.numel():
        _diagonal_inverse_kernel[(b * h, n_blocks)](kr, *ks, dinv, h, t, d, 1.0 / math.sqrt(d), math.sqrt(d),
                                                    DOTS=_dots(dots), BR=br, BD=bd, LEVELS=br.bit_length() - 1,
                                                    num_warps=warps)
    return dinv


def substitute(kr: torch.Tensor, rhs: torch.Tensor, transposed: bool, *, dots: str | None = None,
               block_rows: int | None = None, block_cols: int | None = None,
               num_warps: int | None = None, value_split: int | None = None,
               diagonal: str | None = None, solve: str | None = None,
               dinv: torch.Tensor | None = None) -> torch.Tensor:
    """``P^-1 rhs`` (``P^-T rhs`` if transposed) for ``kr, rhs [B, H, T, d]``: contiguous fp32.
    ``value_split``: programs per head, each solving d / value_split columns (the walk's); ``dots``:
    DOT_PRECISIONS; ``diagonal``: DIAGONALS; ``solve``: SOLVES. ``dinv``: the diagonal blocks' inverses
    already computed (``diagonal_inverses`` of these keys at these ``block_rows`` and ``dots``; the
    forward's, in backward: ``(P^T)_ii^-1 = (P_ii^-1)^T``, which the transposed walk reads as such); else
    computed here."""
    b, h, t, d = kr.shape
    br, bc, bd, warps = _launch_config(block_rows, block_cols, num_warps, d)
    bv = _value_block(value_split, bd)
    inverse = _diagonal(diagonal)
    lookback = _solve(solve, inverse, b * h * (bd // bv), kr.device)
    kr, ks = _head_strides(kr)
    rhs, rs = _head_strides(rhs)
    out = torch.empty(b, h, t, d, device=kr.device, dtype=torch.float32)
    if not out.numel():
        return out
    if not inverse:
        dinv = out  # unused: the walk solves each diagonal block in registers (the look-back implies inverse)
    elif dinv is None:
        dinv = diagonal_inverses(kr, dots=dots, block_rows=br, num_warps=warps)
    elif dinv.shape != inverses_shape(b, h, t, br) or dinv.dtype != torch.float32 or not dinv.is_contiguous():
        raise ValueError(f"dinv must be contiguous fp32 {inverses_shape(b, h, t, br)} (diagonal_inverses of "
                         f"these keys), got {dinv.dtype} {tuple(dinv.shape)}")
    if lookback:
        n_blocks = triton.cdiv(t, br)
        sync = torch.zeros(b * h * n_blocks + 1, device=kr.device, dtype=torch.int32)  # flags, then the ticket
        _lookback_kernel[(n_blocks * b * h,)](kr, *ks, rhs, *rs, out, dinv, sync, sync[-1:], h, b * h, t, d,
                                              1.0 / math.sqrt(d), math.sqrt(d), MAX_SPIN, TRANSPOSED=transposed,
                                              DOTS=_dots(dots), BR=br, BD=bd, num_warps=warps,
                                              # no software pipelining: a prefetch of the next block's rows
                                              # would be issued before that block's flag is acquired
                                              num_stages=1)
    else:
        _substitute_kernel[(b * h, bd // bv)](kr, *ks, rhs, *rs, out, dinv, h, t, d, 1.0 / math.sqrt(d),
                                              math.sqrt(d), TRANSPOSED=transposed, DOTS=_dots(dots), BR=br,
                                              BC=bc, BD=bd, BV=bv, INVERSE=inverse, num_warps=warps)
    return out


def key_grad(kr: torch.Tensor, x: torch.Tensor, dv: torch.Tensor, *, dots: str | None = None,
             block_rows: int | None = None, block_cols: int | None = None, num_warps: int | None = None,
             num_stages: int | None = None) -> torch.Tensor:
    """``dkr`` from the solution ``x`` and ``dv = P^-T dX`` (both contiguous fp32): fp32. The launch is its
    own (unset values from KEY_GRAD_*): its programs are per row block, independent, and take all of d."""
    b, h, t, d = kr.shape
    launch = _key_grad_launch(block_rows, block_cols, num_warps, num_stages)
    kr, ks = _head_strides(kr)
    x, dv = x.contiguous().float(), dv.contiguous().float()
    dk = torch.empty(b, h, t, d, device=kr.device, dtype=torch.float32)
    if not dk.numel():
        return dk
    args = (kr, *ks, x, dv, dk, h, t, d, 1.0 / math.sqrt(d), math.sqrt(d))
    consts = dict(DOTS=_dots(dots), BD=max(16, triton.next_power_of_2(d)))

    def run(launch: dict) -> None:
        _key_grad_kernel[(b * h, triton.cdiv(t, launch["BR"]))](*args, **consts, **launch)

    asked = any(v is not None for v in (block_rows, block_cols, num_warps, num_stages))
    key = (kr.device, consts["BD"], consts["DOTS"])
    small = dict(BR=BLOCK_ROWS, BC=BLOCK_COLS, num_warps=NUM_WARPS)  # the substitutions' tiles
    if not asked and key in _KEY_GRAD_TOO_LARGE:
        launch = small
    try:
        run(launch)
    except triton.runtime.errors.OutOfResources as error:
        if asked or launch is small:
            raise  # a launch asked for (the bench's sweep) is reported, not replaced
        # KEY_GRAD_*'s tiles were timed on an H100 (227 KiB of shared memory a block); a GPU with less (a
        # consumer card's ~100 KiB) or a larger head dim runs the substitutions' smaller tiles from now on
        _KEY_GRAD_TOO_LARGE.add(key)
        warnings.warn(f"LUCID's key gradient: {error}; running the smaller tiles {BLOCK_ROWS} / {BLOCK_COLS} / "
                      f"{NUM_WARPS} warps instead of KEY_GRAD_* (slower, same result)", stacklevel=2)
        run(small)
    return dk


# (device, padded head dim, products) where KEY_GRAD_*'s tiles did not fit: the smaller ones run there directly
_KEY_GRAD_TOO_LARGE: set[tuple] = set()


def solve_kernel(kr: torch.Tensor, v: torch.Tensor, **launch) -> torch.Tensor:
    """``X = P^-1 V`` by the forward kernel: fp32 ``[B, H, T, d]``."""
    return substitute(kr, v, transposed=False, **launch)


def solve_kernel_keeping_inverses(kr: torch.Tensor, v: torch.Tensor, **launch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, dinv)``: ``dinv`` the diagonal blocks' inverses the solve used, for the backward's transposed
    walk to reuse (the same blocks: ``_diagonal_inverse_kernel`` once a step, not twice); empty where the
    diagonal step is "substitute" (no inverses). ``launch``: ``substitute``'s keywords."""
    if not _diagonal(launch.get("diagonal")):
        return substitute(kr, v, transposed=False, **launch), kr.new_empty(0, dtype=torch.float32)
    dinv = diagonal_inverses(kr, dots=launch.get("dots"), block_rows=launch.get("block_rows"),
                             num_warps=launch.get("num_warps"))
    return substitute(kr, v, transposed=False, dinv=dinv, **launch), dinv


def solve_backward_kernel(kr: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, key_grad_launch: dict | None = None,
                          dinv: torch.Tensor | None = None, **launch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dkr, dv)`` by the kernels (fp32), as ``solve_backward_reference``. ``launch``: the back
    substitution's (``substitute``'s keywords); the key gradient shares only its ``dots`` and takes its own
    launch from ``key_grad_launch`` (``key_grad``'s keywords; unset: KEY_GRAD_*). ``dinv``: the forward's
    diagonal inverses (``solve_kernel_keeping_inverses``), else recomputed."""
    dv = substitute(kr, dx, transposed=True, dinv=dinv, **launch)
    return key_grad(kr, x, dv, **{"dots": launch.get("dots"), **(key_grad_launch or {})}), dv


# ---- the op -----------------------------------------------------------------------------------
def _require_kernel(kr: torch.Tensor, v: torch.Tensor) -> None:
    reason = kernel_unavailable_reason(kr.device, (kr.dtype, v.dtype), kr.shape[-1])
    if reason is not None:
        raise RuntimeError(f"LUCID's Triton kernel cannot run here: {reason}; use lucid_impl 'torch' or 'auto'")


def _kernel_inverses_shape(kr: torch.Tensor, use_kernel: bool, block_rows: int, diagonal: str) -> tuple[int, ...]:
    """The shape of ``lucid_solve_op``'s second output (``solve_kernel_keeping_inverses``)."""
    if not use_kernel or not _diagonal(diagonal):
        return (0,)
    b, h, t, _ = kr.shape
    return inverses_shape(b, h, t, block_rows)


# The launch settings that shape the op's outputs or its numbers (the inverses' block size, whether there are
# inverses, the products' precision) are op arguments, read from the module by ``lucid_solve`` at each call:
# torch.compile guards on them and a cached compiled graph keys on them, and forward and backward use the same.
@torch.library.custom_op("neollm::lucid_solve", mutates_args=())
def lucid_solve_op(kr: torch.Tensor, v: torch.Tensor, use_kernel: bool, block_rows: int, diagonal: str,
                   dots: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, dinv)``: ``X = P^-1 V`` per (batch, head) for RMS-normalised keys ``kr`` and values ``v``, both
    ``[B, H, T, d]``, contiguous in kr's dtype (the compute dtype: fp32, or fp64 in tests); ``dinv`` the
    diagonal blocks' inverses, kept for backward (fp32; empty for the reference and the "substitute"
    diagonal). ``use_kernel``: the Triton kernels (CUDA, or the CPU interpreter), else the reference;
    ``block_rows``, ``diagonal``, ``dots``: the kernels' (BLOCK_ROWS, DIAGONAL, DOT_PRECISION)."""
    with torch.autocast(kr.device.type, enabled=False):
        if use_kernel:
            _require_kernel(kr, v)
            x, dinv = solve_kernel_keeping_inverses(kr, v, block_rows=block_rows, diagonal=diagonal, dots=dots)
            return x.to(kr.dtype), dinv
        return solve_reference(kr, v).contiguous(), kr.new_empty(0, dtype=torch.float32)


@lucid_solve_op.register_fake
def _(kr, v, use_kernel, block_rows, diagonal, dots):
    shape = _kernel_inverses_shape(kr, use_kernel, block_rows, diagonal)
    return kr.new_empty(v.shape), kr.new_empty(shape, dtype=torch.float32)


def lucid_solve(kr: torch.Tensor, v: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    """``X = P^-1 V`` (``lucid_solve_op``'s first output) at the module's BLOCK_ROWS, DIAGONAL and
    DOT_PRECISION."""
    return lucid_solve_op(kr, v, use_kernel, BLOCK_ROWS, DIAGONAL, DOT_PRECISION)[0]


@torch.library.custom_op("neollm::lucid_solve_backward", mutates_args=())
def lucid_solve_backward(kr: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, dinv: torch.Tensor,
                         use_kernel: bool, block_rows: int, diagonal: str,
                         dots: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dkr, dv)`` in kr's dtype, contiguous: see ``solve_backward_reference``; ``dinv``: the forward's
    diagonal inverses (empty: none to reuse); the launch settings as the forward's."""
    with torch.autocast(kr.device.type, enabled=False):
        if use_kernel:
            _require_kernel(kr, dx)
            dkr, dv = solve_backward_kernel(kr, x, dx, dinv=dinv if dinv.numel() else None, block_rows=block_rows,
                                            diagonal=diagonal, dots=dots)
            return dkr.to(kr.dtype), dv.to(kr.dtype)
        dkr, dv = solve_backward_reference(kr, x, dx)
        return dkr.contiguous(), dv.contiguous()


@lucid_solve_backward.register_fake
def _(kr, x, dx, dinv, use_kernel, block_rows, diagonal, dots):
    return kr.new_empty(kr.shape), kr.new_empty(kr.shape)


def _setup_context(ctx, inputs, output):
    kr, v, *settings = inputs
    x, dinv = output
    ctx.mark_non_differentiable(dinv)
    ctx.save_for_backward(kr, x, dinv)  # X, the keys and the diagonal inverses: P is rebuilt, never kept
    ctx.settings, ctx.v_dtype = settings, v.dtype  # use_kernel, block_rows, diagonal, dots


def _backward(ctx, dx, _ddinv):
    kr, x, dinv = ctx.saved_tensors
    dkr, dv = lucid_solve_backward(kr, x, dx.contiguous(), dinv, *ctx.settings)
    return dkr, dv.to(ctx.v_dtype), None, None, None, None


lucid_solve_op.register_autograd(_backward, setup_context=_setup_context)

# The op whose output selective-op activation checkpointing keeps (neollm/parallelize.py): recomputing it
# in backward would redo the T x T Gram matrix and the triangular solve, LUCID's costliest part.
LUCID_OPS = (torch.ops.neollm.lucid_solve.default,)
