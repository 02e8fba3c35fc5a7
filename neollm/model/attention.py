"""Full causal self-attention (GQA + RoPE) and NeoLLM's attention-side techniques.

With every switch off this is the attention of a plain Llama/Qwen-style decoder. ``x [B, T, D]``
is the (normalised) block input; q has H heads, k/v have Hkv heads (GQA group g = H / Hkv, query
head h reads KV head h // g); ``d`` is the head dim. The kernel is always
``F.scaled_dot_product_attention(is_causal=True)`` (flash / cuDNN / memory-efficient on GPU): the T x T
softmax matrix is never materialised. Only LUCID forms a T x T matrix (its preconditioner).

Order of operations (each step only when its switch is on)
-----------------------------------------------------------
1. projections: ``q = Wq x`` [B,T,H,d], ``k = Wk x``, ``v = Wv x`` [B,T,Hkv,d]
   (+ gate / affine / router logits from x, also via ``make_linear``).
2. MEA (``mea``): head mixing of k and v across the Hkv heads, then per-head GroupNorm.
3. QK(V) norm: SeeDNorm on q, k (``seednorm_qk``); RMSNorm with gain on q, k, v (``qkv_norm``);
   with both on, SeeDNorm takes q/k and v gets the RMSNorm.
4. RoPE on q, k.
5. momentum (``momentum_gamma`` > 0) on q, k.
   (3-5 on q and k as one custom op, ``neollm::qk_path`` of neollm/kernels/qk_path.py, where
   ``seednorm_qk`` is on and NEOLLM_QK_PATH_IMPL resolves to its Triton kernels; ``forward`` only,
   decoding keeps the separate steps.)
6. kernel: ``y = SDPA(q, k, V', causal, dropout_p)`` with ``V' = X = P^-1 v`` if ``lucid`` else v;
   affine-scaled attention (``affine_scaled_attention``) mixes in the causal mean of V'.
7. XSA (``xsa``): remove y's component along the token's own v.
8. directional routing (``directional_routing``).
9. output gate (``attention_output_gate``).
   Steps 7-9 are one function, neollm.kernels.attention_epilogue (Triton kernels on CUDA by
   default, ``NEOLLM_EPILOGUE_IMPL``).
10. ``out = Wo y``.

Techniques (paper, formula, interpretation, extra params per layer at D=512, H=8, Hkv=4, d=64, cost)
-----------------------------------------------------------------------------------------------
* SeeDNorm — arXiv 2510.22777. Per head vector x in R^d: ``y = (tanh(<x, beta>) * alpha + gamma)
  * x / rms(x)``. One (gamma, alpha, beta) [d] set for q and one for k, shared across heads
  (QK-norm convention; interpretation). Init gamma=1, alpha=1, beta=0, so at init it IS RMSNorm
  without gain (tanh(0)=0); note alpha's gradient is exactly 0 while beta=0 (it starts moving once
  beta does). fp32 math. Params 2*3*64 = 384; cost: one d-dot per head-token.
* QKV-norm — HybridNorm, arXiv 2503.04598 (the attention half; the FFN post-norm is block.py's
  ``hybrid_norm``). RMSNorm with a learnable gain [d] shared across heads on q, k and v each,
  before RoPE. With ``seednorm_qk`` also on, q/k get SeeDNorm (not both norms) and v gets RMSNorm.
  Params 3*64 = 192 (64 when seednorm_qk takes q/k).
* MEA — arXiv 2601.19611 (Multi-head Explicit Attention). Head-level linear composition
  ``k'[.., j, :] = sum_i C_K[j, i] k[.., i, :]`` (same with C_V for v), C_K, C_V [Hkv, Hkv] init
  identity, then GroupNorm with one group per head (= LayerNorm over each head's d channels,
  affine weight/bias [Hkv, d], init 1/0) on k' and v'. Interpretation (paper body/code not read):
  the GroupNorm is applied to the recombined k and v (not to the attention output), Hkv -> Hkv
  (no extra "virtual" heads). At init the mixing is the identity, so MEA = per-head GroupNorm of
  k and v. Params 2*16 + 2*2*4*64 = 1,056; cost: a 4x4 einsum per token.
* Momentum Attention — arXiv 2602.04902. ``q_t <- q_t + gamma (q_t - q_{t-1})``, same for k, with
  q_{-1} := 0 (``momentum_first = "zero"``, the NeoLLM author's fused kernel: masked loads with 0 before
  t = 0 in Kitsunp/ml-cross-entropy cut_cross_entropy/repo_grape/triton.py @ 277de8d, and its test's
  reference ``F.pad(x[..., :-1, :], (0, 0, 1, 0))`` in tests/test_repo_grape.py) or q_{-1} := q_0
  (``"repeat"``, first velocity 0, our earlier reading and the field's default); AFTER QK norm and RoPE (the paper's orthogonality argument
  needs it after the rotation; NeoLLM's fused op does the same). gamma is a fixed float (seed
  0.1), no params. With packed documents the velocity is not reset at document starts (the
  attention is not document-masked either). Cost: one shifted subtraction.
* Affine-Scaled Attention — arXiv 2602.23057. ``O = (alpha * softmax(QK^T/sqrt(d) + M) + beta) V``
  with, per head and query token i, ``alpha_{h,i} = 1 + tanh(x_i . w_h + b_h)`` in (0, 2) and
  ``beta_{h,i} = (1 - alpha_{h,i}) / (i + 1)`` spread uniformly over the i+1 visible keys. So
  ``O_i = alpha_i * SDPA_i + (1 - alpha_i) * mean_{j<=i} v_j`` (cumsum, no T x T). Interpretation
  (paper body not read): the 1+tanh form and the mass-preserving beta (each row of
  alpha*P + beta still sums to 1; alpha > 1 sharpens past softmax, alpha < 1 mixes in the uniform
  average). w = ``make_linear(D, H, role="attn_affine")`` is zero-initialised and b = 0, so the
  layer is EXACTLY plain attention at init (alpha=1, beta=0) while both still get gradients.
  With LUCID on, the uniform term averages X (the same V' the softmax reads). Params
  512*8 + 8 = 4,104; cost: one cumsum over T of V'.
* LUCID — arXiv 2602.10410. Per KV head, ``K_rn = k / rms(k)`` (no gain) of the keys that enter
  the kernel (after norm, RoPE and momentum), ``P = tril(exp(K_rn K_rn^T / sqrt(d) - sqrt(d)))``
  (unit diagonal since ||k_rn||^2 = d; off-diagonal entries in (0, 1] by Cauchy-Schwarz, so the
  exp never overflows), ``X = P^-1 v`` in fp32 by the custom op ``neollm::lucid_solve``
  (attention_ops.lucid_values: Triton kernels that never form P on CUDA by default, the PyTorch
  reference elsewhere or with NEOLLM_LUCID_IMPL=torch; backward keeps only X and the normalised keys), then ``O = SDPA(q, k, X)``. Causal (P
  lower-triangular). No params. Cost per KV head: a [T,d]x[d,T] Gram (2*T^2*d FLOPs) + a
  triangular solve (T^2*d FLOPs); flops.py counts these FLOPs.
* XSA — arXiv 2603.09078. ``z_i = y_i - <y_i, v_i> / (||v_i||^2 + eps) * v_i`` per head, v_i the
  token's own value of the head's KV group (GQA: head h uses v of KV head h // g). v is the value
  after MEA / norm, before LUCID (the token's own "self" value, not its preconditioned X —
  interpretation). eps = 1e-6, fp32. No params; cost: two d-dots per head-token.
* Directional routing — arXiv 2603.14923. Interpretation of the model card / abstract (the
  method section was not retrieved): each head has K learned directions ``U[h, k, :]``
  (unit-normalised in forward, not orthogonalised), a router shared by all heads
  ``r = sigmoid(x W_r + b_r)`` [B, T, H, K] and ``o' = o - sum_k r_{h,k} <o, u_{h,k}> u_{h,k}``.
  Init U ~ N(0, 1), W_r normal(init_std), b_r = -2 (r ~ 0.12: near identity, not exact). Params
  8*4*64 + 512*32 + 32 = 18,464 (K=4); cost: 2K d-dots per head-token.
* Gated Attention — arXiv 2505.06708, variant G1: ``y = y * sigmoid(x W_g)``, W_g: D -> H*d
  ("elementwise", 262,144 params) or D -> H ("headwise", one gate per head, 4,096 params); from the
  normalised layer input x, before Wo; no bias, init normal(init_std) (gate ~ 0.5 at init). A
  separate projection (Qwen3-Next fuses it into Wq; same maths).
* attention dropout — dropout on the attention probabilities while training (SDPA
  ``dropout_p``), as the FANformer flavor (0.1); off in eval.

Decoding (``new_state`` / ``step``, driven by neollm.inference)
--------------------------------------------------------------
``step`` runs steps 1-10 for T new tokens at positions pos.. against an ``AttentionState`` (every
tensor allocated by ``new_state``, afterwards only written in place: fixed addresses, CUDA-graph
safe). ``pos`` is a Python int (prefill and dynamic decoding, T >= 1) or an int64 tensor [1] (the
static step, T = 1); neollm.model.decode_index holds the only code that differs between the two
(slices vs ``index_copy_`` and masks over the whole buffer), so each formula below is written once.
State per technique (everything else is per token and needs none):
* keys / values: the kernel's keys (after MEA, norm, RoPE at the absolute positions, momentum) and
  the V' the kernel reads, written at pos..; the kernel is SDPA against the cached rows (a causal
  mask inside a chunk of T > 1; for T = 1 the query heads of a KV group lie along the query axis,
  so GQA needs neither ``enable_gqa`` nor repeated keys);
* momentum: the previous token's post-RoPE, pre-momentum q and k rows (at position 0 the token's
  own or zeros, ``momentum_first``, as ``ops.momentum_shift``);
* LUCID: the RMS-normalised keys and X in the compute dtype; new rows solve
  ``x_t = v_t - sum_{j<t} P_tj x_j``: the part over cached positions is one matmul, the part inside
  the chunk a unit-lower-triangular solve (skipped for T = 1, where it is the identity);
* affine-scaled attention: the running sum of V' (compute dtype); the count is the position + 1.

Parameters that must not be weight-decayed (norm gains, SeeDNorm/GroupNorm vectors, MEA mixing
matrices, affine and router biases, routing directions — scale-free since they are normalised)
carry ``_no_weight_decay = True``. The flag is set again in ``init_weights`` because building on
the meta device and ``to_empty`` replace the Parameter objects (and with them the attribute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from neollm.kernels import qk_path
from neollm.kernels.attention_epilogue import attention_epilogue, grouped
from neollm.model import attention_ops as ops
from neollm.model.args import NeoLLMModelArgs
from neollm.model.decode_index import (
    Position, causal_mask, check_position, first_or_cached, over_cached, positions, rows_at, visible, write_rows,
)
from neollm.model.init_utils import copy_full_
from neollm.model.linear import init_linear, make_linear
from neollm.model.rope import apply_rope

XSA_EPS = 1e-6
ROUTER_BIAS_INIT = -2.0


@dataclass
class AttentionState:
    """One attention layer's decode state, [B, Hkv, L, d] buffers over L = max_len positions."""

    keys: Tensor                      # kernel keys (model dtype)
    values: Tensor                    # V' (v, or LUCID's X cast to the model dtype)
    lucid_keys: Tensor | None = None  # rms-normalised keys (compute dtype)
    lucid_x: Tensor | None = None     # X = P^-1 v (compute dtype)
    prev_q: Tensor | None = None      # [B, 1, H, d] last post-RoPE pre-momentum q row
    prev_k: Tensor | None = None      # [B, 1, Hkv, d]
    value_sum: Tensor | None = None   # [B, Hkv, d] running sum of V' (compute dtype)

    def tensors(self) -> list[Tensor]:
        """Every allocated tensor (for reset and address checks)."""
        every = (self.keys, self.values, self.lucid_keys, self.lucid_x, self.prev_q, self.prev_k, self.value_sum)
        return [t for t in every if t is not None]


class Attention(nn.Module):
    def __init__(self, args: NeoLLMModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.eps = args.norm_eps
        h, hkv, d = args.n_heads, args.n_kv_heads, args.head_dim
        q_dim, kv_dim = h * d, hkv * d
        self.wq = make_linear(args.dim, q_dim, args, role="q")
        self.wk = make_linear(args.dim, kv_dim, args, role="k")
        self.wv = make_linear(args.dim, kv_dim, args, role="v")
        self.wo = make_linear(q_dim, args.dim, args, role="o")

        self.seednorm_qk = args.seednorm_qk
        self.qkv_norm = args.qkv_norm
        self.mea = args.mea
        self.momentum_gamma = float(args.momentum_gamma)
        self.momentum_first = args.momentum_first
        self.affine = args.affine_scaled_attention
        self.lucid = args.lucid
        self.xsa = args.xsa
        self.routing = args.directional_routing
        self.gate_kind = args.attention_output_gate
        self.dropout_p = float(args.attention_dropout)

        def vector(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape))

        if self.seednorm_qk:  # gamma, alpha, beta for q and for k
            self.q_seed_gamma, self.q_seed_alpha, self.q_seed_beta = vector(d), vector(d), vector(d)
            self.k_seed_gamma, self.k_seed_alpha, self.k_seed_beta = vector(d), vector(d), vector(d)
        if self.qkv_norm:
            if not self.seednorm_qk:
                self.q_norm_weight, self.k_norm_weight = vector(d), vector(d)
            self.v_norm_weight = vector(d)
        if self.mea:
            self.mea_k_mix, self.mea_v_mix = vector(hkv, hkv), vector(hkv, hkv)
            # GroupNorm's affine as nn.GroupNorm(hkv, hkv * d) holds it, one flat vector: Conda gives a 1-D
            # parameter its Adam step (a 2-D one its projected matrix step at conda_scale)
            self.mea_k_weight, self.mea_k_bias = vector(hkv * d), vector(hkv * d)
            self.mea_v_weight, self.mea_v_bias = vector(hkv * d), vector(hkv * d)
        if self.affine:
            self.affine_proj = make_linear(args.dim, h, args, role="attn_affine")
            self.affine_bias = vector(h)
        if self.routing:
            k_dirs = args.routing_directions
            self.routing_directions = vector(h, k_dirs, d)
            self.router = make_linear(args.dim, h * k_dirs, args, role="attn_router")
            self.router_bias = vector(h * k_dirs)
        if self.gate_kind != "none":
            gate_out = q_dim if self.gate_kind == "elementwise" else h
            self.gate_proj = make_linear(args.dim, gate_out, args, role="attn_gate")
        self._mark_no_weight_decay()
        self.init_weights(args.init_std, args.init_std)

    # ---- init ----------------------------------------------------------------------------
    def _no_weight_decay_params(self) -> list[nn.Parameter]:
        names = ("q_seed_gamma", "q_seed_alpha", "q_seed_beta", "k_seed_gamma", "k_seed_alpha",
                 "k_seed_beta", "q_norm_weight", "k_norm_weight", "v_norm_weight", "mea_k_mix",
                 "mea_v_mix", "mea_k_weight", "mea_k_bias", "mea_v_weight", "mea_v_bias",
                 "affine_bias", "routing_directions", "router_bias")
        return [getattr(self, n) for n in names if hasattr(self, n)]

    def _mark_no_weight_decay(self) -> None:
        for p in self._no_weight_decay_params():
            p._no_weight_decay = True

    def init_weights(self, init_std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            init_linear(linear, init_std)
        init_linear(self.wo, out_std)
        with torch.no_grad():
            if self.seednorm_qk:
                for gamma in (self.q_seed_gamma, self.k_seed_gamma):
                    gamma.fill_(1.0)
                for alpha in (self.q_seed_alpha, self.k_seed_alpha):
                    alpha.fill_(1.0)
                for beta in (self.q_seed_beta, self.k_seed_beta):
                    beta.zero_()  # tanh(0) = 0: starts as RMSNorm without gain
            if self.qkv_norm:
                if not self.seednorm_qk:
                    self.q_norm_weight.fill_(1.0)
                    self.k_norm_weight.fill_(1.0)
                self.v_norm_weight.fill_(1.0)
            if self.mea:
                for mix in (self.mea_k_mix, self.mea_v_mix):
                    copy_full_(mix, torch.eye(self.n_kv_heads))  # sharded under FSDP2
                self.mea_k_weight.fill_(1.0)
                self.mea_v_weight.fill_(1.0)
                self.mea_k_bias.zero_()
                self.mea_v_bias.zero_()
            if self.affine:
                self.affine_bias.zero_()
            if self.routing:
                nn.init.normal_(self.routing_directions)  # unit-normalised in forward
                self.router_bias.fill_(ROUTER_BIAS_INIT)
        if self.affine:
            init_linear(self.affine_proj, 0.0)  # alpha = 1 exactly: plain attention at init
        if self.routing:
            init_linear(self.router, init_std)
        if self.gate_kind != "none":
            init_linear(self.gate_proj, init_std)
        self._mark_no_weight_decay()

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        fused = self.fuses_qk(x)
        q, k, v = self.qkv(x, norm_qk=not fused)
        if fused:  # 3-5 on q and k: one op each
            q, k = self.qk_fused(q, k, rope)
        else:  # 4. RoPE, 5. momentum
            q, k = apply_rope(q, rope), apply_rope(k, rope)
            if self.momentum_gamma != 0.0:
                q = ops.momentum_shift(q, self.momentum_gamma, self.momentum_first)
                k = ops.momentum_shift(k, self.momentum_gamma, self.momentum_first)
        # 6. kernel ([B, heads, T, d] layout)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        values = ops.lucid_values(kt, vt, self.eps) if self.lucid else vt
        y = ops.causal_attention(qt, kt, values, self.dropout_p if self.training else 0.0
                                 ).transpose(1, 2)  # [B, T, H, d]
        if self.affine:
            y = self.mix_uniform(y, x, ops.causal_mean(values).transpose(1, 2).unsqueeze(3))
        return self.finish(y, v, x)

    def fuses_qk(self, x: torch.Tensor) -> bool:
        """Steps 3-5 on q and k as the fused op ``neollm::qk_path`` (neollm/kernels/qk_path.py):
        SeeDNorm on q/k and NEOLLM_QK_PATH_IMPL resolving to its kernels. Decided on the layer input:
        q and k have its device, and its dtype or (autocast) a lower kernel dtype."""
        return self.seednorm_qk and qk_path.uses_kernel(qk_path.QK_PATH_IMPL, x)

    def qk_fused(self, q: Tensor, k: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
        """SeeDNorm, RoPE and momentum of the projected q and k by the op's Triton kernels."""
        def path(x: Tensor, gamma: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
            return qk_path.qk_path_op(x, gamma, alpha, beta, rope, self.eps, self.momentum_gamma,
                                      self.momentum_first, True)[0]

        return (path(q, self.q_seed_gamma, self.q_seed_alpha, self.q_seed_beta),
                path(k, self.k_seed_gamma, self.k_seed_alpha, self.k_seed_beta))

    # ---- decoding (see the module docstring) ----------------------------------------------
    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str,
                  kernels: str = "auto") -> AttentionState:
        """Zeroed state for ``batch`` sequences of up to ``max_len`` positions; LUCID's rows and the
        affine sum in the compute dtype. ``kernels`` is unused: the kernel is SDPA everywhere."""
        compute = torch.promote_types(dtype, torch.float32)
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim

        def zeros(*shape: int, dt: torch.dtype = dtype) -> Tensor:
            return torch.zeros(*shape, dtype=dt, device=device)

        state = AttentionState(keys=zeros(batch, hkv, max_len, d), values=zeros(batch, hkv, max_len, d))
        if self.lucid:
            state.lucid_keys = zeros(batch, hkv, max_len, d, dt=compute)
            state.lucid_x = zeros(batch, hkv, max_len, d, dt=compute)
        if self.momentum_gamma != 0.0:
            state.prev_q, state.prev_k = zeros(batch, 1, h, d), zeros(batch, 1, hkv, d)
        if self.affine:
            state.value_sum = zeros(batch, hkv, d, dt=compute)
        return state

    def step(self, x: Tensor, state: AttentionState, pos: Position, rope: Tensor) -> Tensor:
        """``forward`` for T new tokens x [B, T, D] at positions pos.. given the earlier ones'
        ``state`` (updated in place). ``pos``: an int (any T) or an int64 tensor [1] (T = 1; no
        host sync, no allocation of state, every shape independent of the position)."""
        T = x.shape[1]
        check_position(pos, T)
        q, k, v = self.qkv(x)
        # 4. RoPE at the absolute positions, 5. momentum against the cached previous rows
        table = rows_at(rope, pos, T)
        q, k = apply_rope(q, table), apply_rope(k, table)
        if self.momentum_gamma != 0.0:
            q, k = self._momentum_step(q, state.prev_q, pos), self._momentum_step(k, state.prev_k, pos)
        # 6. kernel over the cached rows
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        write_rows(state.keys, kt, pos)
        values = self._lucid_step(kt, vt, state, pos) if self.lucid else vt
        write_rows(state.values, values, pos)
        y = self._attend_cached(qt, state, pos)
        if self.affine:
            y = self.mix_uniform(y, x, self._running_mean(values, state, pos))
        return self.finish(y, v, x)

    def _momentum_step(self, x: Tensor, previous_row: Tensor, pos: Position) -> Tensor:
        """``x_t + gamma (x_t - x_{t-1})`` with x_{pos-1} the cached row (at position 0: x_0 or
        zeros, as ``ops.momentum_shift``); the cache then holds this chunk's last row."""
        head = torch.zeros_like(x[:, :1]) if self.momentum_first == "zero" else x[:, :1]
        previous = torch.cat([first_or_cached(pos, head, previous_row), x[:, :-1]], dim=1)
        previous_row.copy_(x[:, -1:])
        return x + self.momentum_gamma * (x - previous)

    def _lucid_step(self, kt: Tensor, vt: Tensor, state: AttentionState, pos: Position) -> Tensor:
        """LUCID's new rows of X = P^-1 v, ``x_t = v_t - sum_{j<t} P_tj x_j`` (compute dtype, stored):
        one matmul over the cached positions, then a unit-lower-triangular solve inside the chunk."""
        T, d = kt.shape[2], kt.shape[3]
        kr = ops.rms_normalize(kt, self.eps)
        write_rows(state.lucid_keys, kr, pos)
        keys = visible(state.lucid_keys, pos, T)
        p_rows = torch.exp(kr @ keys.transpose(-1, -2) / math.sqrt(d) - math.sqrt(d))  # [B, Hkv, T, visible]
        x_new = vt.to(kr.dtype) - over_cached(p_rows, state.lucid_x, pos)
        if T > 1:  # an int position (check_position); for one token the unit-diagonal solve is the identity
            x_new = torch.linalg.solve_triangular(p_rows[..., pos:pos + T].tril(), x_new, upper=False,
                                                  unitriangular=True)
        write_rows(state.lucid_x, x_new, pos)
        return x_new.to(vt.dtype)

    def _attend_cached(self, qt: Tensor, state: AttentionState, pos: Position) -> Tensor:
        """SDPA of the new queries qt [B, H, T, d] over the cached keys and values -> [B, T, H, d]."""
        batch, h, T, d = qt.shape
        hkv = self.n_kv_heads
        keys, values = visible(state.keys, pos, T), visible(state.values, pos, T)
        mask = causal_mask(pos, T, keys.shape[2], qt.device)
        if T == 1:  # the query heads of one KV group along the query axis: GQA without repeated keys
            y = F.scaled_dot_product_attention(qt.reshape(batch, hkv, h // hkv, d), keys, values, attn_mask=mask)
            return y.reshape(batch, 1, h, d)
        y = F.scaled_dot_product_attention(qt, keys, values, attn_mask=mask, enable_gqa=hkv != h)
        return y.transpose(1, 2)

    def _running_mean(self, values: Tensor, state: AttentionState, pos: Position) -> Tensor:
        """Affine-scaled attention's causal mean of V' [B, Hkv, T, d] at the new positions, from the
        running sum (compute dtype, updated) over position + 1 values -> [B, T, Hkv, 1, d]."""
        T = values.shape[2]
        total = state.value_sum.dtype
        csum = state.value_sum.unsqueeze(2) + torch.cumsum(values.to(total), dim=2)  # [B, Hkv, T, d]
        state.value_sum.copy_(csum[:, :, -1])
        count = (positions(pos, T, values.device) + 1).to(total).view(1, 1, T, 1)
        return (csum / count).to(values.dtype).transpose(1, 2).unsqueeze(3)

    def qkv(self, x: torch.Tensor, norm_qk: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-3: projections, MEA, QK(V) norm -> q [B, T, H, d], k and v [B, T, Hkv, d].
        ``norm_qk=False`` leaves SeeDNorm on q and k to the fused q/k op (``qk_fused``)."""
        batch, seq_len, _ = x.shape
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        # 1. projections
        q = self.wq(x).view(batch, seq_len, h, d)
        k = self.wk(x).view(batch, seq_len, hkv, d)
        v = self.wv(x).view(batch, seq_len, hkv, d)
        # 2. MEA: head mixing + per-head GroupNorm
        if self.mea:
            k = ops.head_group_norm(ops.mix_heads(k, self.mea_k_mix), self.mea_k_weight.view(hkv, d),
                                    self.mea_k_bias.view(hkv, d), self.eps)
            v = ops.head_group_norm(ops.mix_heads(v, self.mea_v_mix), self.mea_v_weight.view(hkv, d),
                                    self.mea_v_bias.view(hkv, d), self.eps)
        # 3. QK(V) norm
        if self.seednorm_qk:
            if norm_qk:
                q = ops.seednorm(q, self.q_seed_gamma, self.q_seed_alpha, self.q_seed_beta, self.eps)
                k = ops.seednorm(k, self.k_seed_gamma, self.k_seed_alpha, self.k_seed_beta, self.eps)
        elif self.qkv_norm:
            q = ops.rms_norm(q, self.q_norm_weight, self.eps)
            k = ops.rms_norm(k, self.k_norm_weight, self.eps)
        if self.qkv_norm:
            v = ops.rms_norm(v, self.v_norm_weight, self.eps)
        return q, k, v

    def mix_uniform(self, y: torch.Tensor, x: torch.Tensor, mean_v: torch.Tensor) -> torch.Tensor:
        """Affine-scaled attention: alpha * y + (1 - alpha) * mean_v, alpha from x.

        y [B, T, H, d]; mean_v [B, T, Hkv, 1, d], the causal mean of the values the kernel read.
        """
        hkv = self.n_kv_heads
        logits = self.affine_proj(x)
        dt = ops.compute_dtype(logits)
        alpha = 1.0 + torch.tanh(logits.to(dt) + self.affine_bias.to(dt))  # [B, T, H]
        alpha = grouped(alpha.unsqueeze(-1), hkv)                      # [B, T, Hkv, g, 1]
        return (alpha * grouped(y, hkv) + (1.0 - alpha) * mean_v).flatten(2, 3).to(y.dtype)

    def finish(self, y: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Steps 7-10 on the kernel output y [B, T, H, d]: XSA, routing, output gate (one op,
        neollm.kernels.attention_epilogue), then Wo."""
        batch, seq_len, h, d = y.shape
        route = gate = None
        if self.routing:  # the router's logits; the sigmoid is the epilogue's
            route = (self.router(x) + self.router_bias).view(batch, seq_len, h, -1)
        if self.gate_kind == "elementwise":
            gate = self.gate_proj(x).view(batch, seq_len, h, d)
        elif self.gate_kind == "headwise":
            gate = self.gate_proj(x)
        y = attention_epilogue(y, v if self.xsa else None, self.routing_directions if self.routing else None,
                               route, gate, XSA_EPS)
        # 10. output projection
        return self.wo(y.reshape(batch, seq_len, h * d))
