"""Text generation with NeoLLM: incremental (cached) decoding, sampling, checkpoint loading.

The training forward (``NeoLLM.forward``) is untouched: decoding runs through ``forward_step``, a
separate no-grad path that reuses the model's modules and feeds T >= 1 new tokens at positions
``cache.pos .. cache.pos + T - 1``. The same path does the prefill (T = prompt length, empty
cache) and each decode step (T = 1); it returns the logits of the new tokens, equal (up to float
rounding) to the full forward's logits at those positions (tests/test_generate.py checks every
flavor in float64).

Cache per layer
---------------
Every tensor of the cache is allocated (zeros) before the first step (``allocate_cache``, called
by ``forward_step`` on its first call) and from then on only written in place, so its address is
fixed for the cache's life: what the static decode step's CUDA graph needs.
Attention (``AttentionCache``, buffers preallocated to ``max_len`` positions):
* keys: the kernel's keys (after MEA, QK norm, RoPE at their absolute positions and momentum);
* values: V' the kernel reads (v, or LUCID's X = P^-1 v);
* momentum (``momentum_gamma``): the previous token's post-RoPE, pre-momentum q and k rows
  (q_t + gamma (q_t - q_{t-1}), with q_{-1} := q_0 or 0 (``momentum_first``) at position 0 as in training);
* LUCID: the RMS-normalised kernel keys and X in the compute dtype (fp32/fp64). New rows of
  X solve ``x_t = v_t - sum_{j<t} P_tj x_j``: the part over cached positions is one matmul,
  the part inside the chunk a unit-lower-triangular solve (exact for the prefill too);
* affine-scaled attention: the running sum of V' (compute dtype); the count is the position.
Everything else (MEA, SeeDNorm/QKV-norm, XSA, routing, output gate, FAN, PolyNorm, GPAS, LNS,
gated residuals, HybridNorm, SimpleNorm, CoLA, multipliers) is per token: no state.
Gated DeltaNet (``GDNCache``): the recurrent state S [B, H, K, V] (compute dtype, fp32/fp64) and the
short-conv states (the last conv_size - 1 projected q/k/v inputs, zeros at the start = the
training path's causal zero padding).

Static decode step and decode modes
-----------------------------------
``forward_step`` takes positions as Python ints (slices ``[pos:end]``), so its shapes change every
token: it cannot be captured in a CUDA graph, and on a GPU its ~6,000 small ops per token make
it launch-bound. ``neollm.decode_static.static_step`` is the same computation for one token with
the position held in a device tensor (masked attention over the whole buffer, ``index_copy_``
writes); ``neollm.decode_graph.StaticDecoder`` runs it "eager", replays it from a CUDA graph
("cuda_graph") or compiles it ("compile"). ``generate`` picks with ``SamplingConfig.decode_mode``
("auto": "cuda_graph" on CUDA, "dynamic" = ``forward_step`` per token elsewhere); the prompt's
prefill is always ``forward_step``.

Kernels: attention uses ``F.scaled_dot_product_attention`` against the cached keys (an explicit
causal mask for chunks of T > 1). Gated DeltaNet uses the torch references
(``recurrent_gated_delta_rule`` for one token, ``chunk_gated_delta_rule_ref`` for a chunk) on CPU,
and fla's ``fused_recurrent_gated_delta_rule`` / ``chunk_gated_delta_rule`` (with the initial
state) on CUDA when the layer's backend is "auto"/"fla"; ``gdn_kernels="torch"`` forces the
references everywhere.

Batched prompts: prompts of different lengths are grouped by length and each group is decoded
as one batch (no padding, so positions, momentum, LUCID, the affine mean and the GDN state are
exactly those of each prompt alone); results come back in the input order. Sampling draws from
one generator seeded with ``seed``, so a run is reproducible for the same prompts and settings.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from neollm.kernels.gated_delta_rule import chunk_gated_delta_rule_ref
from neollm.model import attention_ops as ops
from neollm.model.attention import Attention
from neollm.model.block import Block
from neollm.model.mixers.common import l2norm
from neollm.model.mixers.deltanet import GatedDeltaNet
from neollm.precision import upcast
from neollm.model.model import NeoLLM
from neollm.model.rope import apply_rope

__all__ = [
    "AttentionCache", "GDNCache", "DecodeCache", "SamplingConfig", "forward_step", "new_cache",
    "allocate_cache", "DECODE_MODES",
    "filter_logits", "sample_next", "generate",
]


# ---- caches ---------------------------------------------------------------------------------
@dataclass
class AttentionCache:
    """Per attention layer; every tensor is allocated (zeros) by ``allocate_cache`` before the
    first step and afterwards only written in place (fixed addresses: CUDA-graph safe)."""

    keys: Tensor | None = None        # [B, Hkv, L, d] kernel keys
    values: Tensor | None = None      # [B, Hkv, L, d] V' (v or LUCID's X, model dtype)
    lucid_keys: Tensor | None = None  # [B, Hkv, L, d] rms-normalised keys (compute dtype)
    lucid_x: Tensor | None = None     # [B, Hkv, L, d] X = P^-1 v (compute dtype)
    prev_q: Tensor | None = None      # [B, 1, H, d] last post-RoPE pre-momentum q row
    prev_k: Tensor | None = None      # [B, 1, Hkv, d]
    value_sum: Tensor | None = None   # [B, Hkv, d] running sum of V' (compute dtype)


@dataclass
class GDNCache:
    state: Tensor | None = None        # [B, H, K, V] recurrent state (compute dtype)
    conv: dict[str, Tensor] | None = None  # "q"/"k"/"v" -> [B, conv_size - 1, C]


@dataclass
class DecodeCache:
    layers: list
    max_len: int
    pos: int = 0
    gdn_kernels: str = "auto"   # "auto": fla on CUDA (layer backend permitting), else torch
    batch: int | None = None    # set by allocate_cache

    def tensors(self) -> list[Tensor]:
        """Every allocated state tensor (for reset and address checks)."""
        out = []
        for c in self.layers:
            if isinstance(c, GDNCache):
                out += [c.state, *(c.conv or {}).values()]
            else:
                out += [c.keys, c.values, c.lucid_keys, c.lucid_x, c.prev_q, c.prev_k, c.value_sum]
        return [t for t in out if t is not None]

    def reset(self) -> None:
        """Back to position 0 for a new sequence of the same batch size, in place (zeros)."""
        for t in self.tensors():
            t.zero_()
        self.pos = 0


def new_cache(model: NeoLLM, max_len: int | None = None, gdn_kernels: str = "auto") -> DecodeCache:
    """An empty cache for up to ``max_len`` positions (default and limit: the RoPE table's length)."""
    limit = model.rope.shape[0]
    max_len = limit if max_len is None else max_len
    if max_len > limit:
        raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {limit} (the RoPE table)")
    if gdn_kernels not in ("auto", "fla", "torch"):
        raise ValueError(f"gdn_kernels must be 'auto', 'fla' or 'torch', got {gdn_kernels!r}")
    unsupported = sorted({b.mixer_code for b in model.layers.values()} - {"A", "D"})
    if unsupported:
        raise ValueError(
            f"cached decoding supports attention (A) and Gated DeltaNet (D) layers; this model has "
            f"{', '.join(unsupported)} layers: decode without the cache (use_cache=False, tools/generate.py --no-cache)"
        )
    layers = [AttentionCache() if b.mixer_code == "A" else GDNCache() for b in model.layers.values()]
    return DecodeCache(layers=layers, max_len=max_len, gdn_kernels=gdn_kernels)


def allocate_cache(model: NeoLLM, cache: DecodeCache, batch: int, dtype: torch.dtype,
                   device: torch.device | str) -> None:
    """Allocate every state tensor of ``cache`` (zeros) for ``batch`` sequences whose activations
    are ``dtype``; state kept in the compute dtype (LUCID, the affine sum, the GDN state) is fp32,
    or fp64 for fp64 models. Afterwards ``forward_step`` and the static step only write in place.
    ``forward_step`` calls this on its first step; the static decoder calls it up front."""
    cdt = torch.promote_types(dtype, torch.float32)
    zeros = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
    for block, c in zip(model.layers.values(), cache.layers):
        m = block.mixer
        if isinstance(c, AttentionCache):
            h, hkv, d, L = m.n_heads, m.n_kv_heads, m.head_dim, cache.max_len
            c.keys, c.values = zeros(batch, hkv, L, d), zeros(batch, hkv, L, d)
            if m.lucid:
                c.lucid_keys, c.lucid_x = zeros(batch, hkv, L, d, dt=cdt), zeros(batch, hkv, L, d, dt=cdt)
            if m.momentum_gamma != 0.0:
                c.prev_q, c.prev_k = zeros(batch, 1, h, d), zeros(batch, 1, hkv, d)
            if m.affine:
                c.value_sum = zeros(batch, hkv, d, dt=cdt)
        else:
            c.state = zeros(batch, m.num_heads, m.head_k_dim, m.head_v_dim, dt=cdt)
            c.conv = {name: zeros(batch, conv.weight.shape[-1] - 1, conv.weight.shape[0])
                      for name, conv in (("q", m.q_conv1d), ("k", m.k_conv1d), ("v", m.v_conv1d))}
    cache.batch = batch


# ---- attention step -------------------------------------------------------------------------
def _attention_step(attn: Attention, x: Tensor, rope: Tensor, c: AttentionCache, pos: int) -> Tensor:
    T = x.shape[1]
    h, hkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    end = pos + T
    q, k, v = attn.qkv(x)  # 1-3: per token, as Attention.forward
    # 4. RoPE at the absolute positions
    table = rope[pos:end]
    q, k = apply_rope(q, table), apply_rope(k, table)
    # 5. momentum against the previous (cached) pre-momentum row
    if attn.momentum_gamma != 0.0:
        g = attn.momentum_gamma
        if pos == 0:  # x_{-1}: x_0 ("repeat") or zeros ("zero"), as ops.momentum_shift
            zero = attn.momentum_first == "zero"
            prev_q = torch.zeros_like(q[:, :1]) if zero else q[:, :1]
            prev_k = torch.zeros_like(k[:, :1]) if zero else k[:, :1]
        else:
            prev_q, prev_k = c.prev_q, c.prev_k
        q_prev = torch.cat([prev_q, q[:, :-1]], dim=1)
        k_prev = torch.cat([prev_k, k[:, :-1]], dim=1)
        c.prev_q.copy_(q[:, -1:])
        c.prev_k.copy_(k[:, -1:])
        q = q + g * (q - q_prev)
        k = k + g * (k - k_prev)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    c.keys[:, :, pos:end] = kt
    # 6. kernel
    if attn.lucid:
        kr = ops.rms_normalize(kt, attn.eps)
        c.lucid_keys[:, :, pos:end] = kr
        p_rows = torch.exp(kr @ c.lucid_keys[:, :, :end].transpose(-1, -2) / math.sqrt(d) - math.sqrt(d))
        rhs = vt.to(kr.dtype)
        if pos:
            rhs = rhs - p_rows[..., :pos] @ c.lucid_x[:, :, :pos]
        x_new = torch.linalg.solve_triangular(p_rows[..., pos:end].tril(), rhs, upper=False,
                                              unitriangular=True)
        c.lucid_x[:, :, pos:end] = x_new
        new_values = x_new.to(vt.dtype)
    else:
        new_values = vt
    c.values[:, :, pos:end] = new_values
    mask = None
    if T > 1:
        mask = (torch.arange(end, device=x.device)[None, :]
                <= torch.arange(pos, end, device=x.device)[:, None])
    y = F.scaled_dot_product_attention(
        qt, c.keys[:, :, :end], c.values[:, :, :end], attn_mask=mask, enable_gqa=hkv != h,
    ).transpose(1, 2)  # [B, T, H, d]
    if attn.affine:
        vdt = c.value_sum.dtype
        csum = c.value_sum.unsqueeze(2) + torch.cumsum(new_values.to(vdt), dim=2)  # [B, Hkv, T, d]
        c.value_sum.copy_(csum[:, :, -1])
        count = torch.arange(pos + 1, end + 1, device=x.device, dtype=vdt).view(1, 1, T, 1)
        y = attn.mix_uniform(y, x, (csum / count).to(new_values.dtype).transpose(1, 2).unsqueeze(3))
    return attn.finish(y, v, x)


# ---- Gated DeltaNet step --------------------------------------------------------------------
def _conv_step(x: Tensor, weight: Tensor, state: Tensor) -> Tensor:
    """Causal depthwise conv + SiLU over new inputs x [B, T, C], continuing from ``state``
    [B, W-1, C] (the last W-1 inputs; zeros at the start, as the training path's padding),
    which is updated in place."""
    W = weight.shape[-1]
    full = torch.cat([state.to(x.dtype), x], dim=1)  # [B, W-1+T, C]
    # y_t = sum_j w[:, j] full[t + j]: a multiply-sum over the windows (F.conv1d's CPU path costs
    # tens of ms per call at T = 1)
    y = (full.unfold(1, W, 1) * weight.squeeze(1).to(x.dtype)).sum(-1)  # [B, T, C]
    state.copy_(full[:, full.shape[1] - (W - 1):])
    return F.silu(y)


def _gdn_use_fla(m: GatedDeltaNet, x: Tensor, kernels: str) -> bool:
    if kernels == "torch" or m.backend == "torch":
        return False
    if kernels == "fla" or m.backend == "fla":
        if not x.is_cuda:
            raise ValueError("fla's Gated DeltaNet kernels need a CUDA input; use gdn_kernels='torch'")
        return True
    return x.is_cuda


def _gdn_step(m: GatedDeltaNet, x: Tensor, c: GDNCache, kernels: str) -> Tensor:
    """T new tokens through the layer; the state and conv states are updated in place. Nothing
    depends on the position, so for T = 1 this is also the static decode step's GDN layer."""
    B, T, _ = x.shape
    H, K, V = m.num_heads, m.head_k_dim, m.head_v_dim
    q = _conv_step(m.q_proj(x), m.q_conv1d.weight, c.conv["q"])
    k = _conv_step(m.k_proj(x), m.k_conv1d.weight, c.conv["k"])
    v = _conv_step(m.v_proj(x), m.v_conv1d.weight, c.conv["v"])
    q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, H, V)
    if _gdn_use_fla(m, x, kernels):
        o, state = _fla_recurrence(m, x, q, k, v, c.state)
    else:
        q, k = l2norm(q), l2norm(k)
        beta = torch.sigmoid(upcast(m.b_proj(x)))
        g = -upcast(m.A_log).exp() * F.softplus(upcast(m.a_proj(x)) + upcast(m.dt_bias))
        if T == 1:
            o, state = _recurrent_step(q, k, v, g, beta, c.state)
        else:
            o, state = chunk_gated_delta_rule_ref(q, k, v, g, beta, chunk_size=m.chunk_size,
                                                  initial_state=c.state, output_final_state=True)
    c.state.copy_(state)
    gate = m.g_proj(x).reshape(B, T, H, V)
    o = m.o_norm(o, gate).reshape(B, T, H * V)
    return m.o_proj(o)


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
    the new state (a new tensor: the caller copies it into the cache).

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


# ---- block / model step ---------------------------------------------------------------------
def _block_step(block: Block, x: Tensor, rope: Tensor, c, cache: DecodeCache) -> Tensor:
    """Block.forward with the mixer run incrementally (everything else is per token)."""
    if block.mixer_code == "A":
        return block(x, rope, mixer=lambda a: _attention_step(block.mixer, a, rope, c, cache.pos))
    return block(x, rope, mixer=lambda a: _gdn_step(block.mixer, a, c, cache.gdn_kernels))


@torch.no_grad()
def forward_step(model: NeoLLM, tokens: Tensor, cache: DecodeCache) -> Tensor:
    """Logits [B, T, vocab] of ``tokens`` [B, T] placed at positions cache.pos.. (cache updated).

    The model must be in eval mode (dropout would make cached and full logits differ)."""
    if model.training:
        raise ValueError("forward_step needs model.eval() (dropout is not cached)")
    B, T = tokens.shape
    if cache.pos + T > cache.max_len:
        raise ValueError(f"{cache.pos + T} positions exceed the cache's max_len {cache.max_len} "
                         f"(the model's context is {model.rope.shape[0]})")
    if cache.batch is not None and B != cache.batch:
        raise ValueError(f"this cache holds {cache.batch} sequences, got a batch of {B}")
    h = model.tok_embeddings(tokens)
    if cache.batch is None:
        allocate_cache(model, cache, B, h.dtype, h.device)
    for block, c in zip(model.layers.values(), cache.layers):
        h = _block_step(block, h, model.rope, c, cache)
    cache.pos += T
    return F.linear(model.norm(h), model.head_weight())


# ---- sampling -------------------------------------------------------------------------------
DECODE_MODES = ("auto", "dynamic", "eager", "cuda_graph", "compile")  # SamplingConfig.decode_mode; decode_graph.py runs them


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 = greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = off."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p; 1 = off."""
    min_length: int = 0
    """New tokens to generate before EOS is allowed (EOS logit set to -inf until then)."""
    repetition_penalty: float = 1.0
    """CTRL/HF-style: logits of tokens already in prompt or output: positive / p, negative * p."""
    seed: int | None = None
    eos_id: int | None = None
    """Stop a sequence at this token (None: always max_new_tokens)."""
    use_cache: bool = True
    """False: a full forward over the whole prefix per token (slow; for checks and benchmarks)."""
    decode_mode: str = "auto"
    """Cached decoding's per-token step: "dynamic" (``forward_step``, Python positions), or the
    static-shape step (neollm/decode_static.py) run "eager", as a "cuda_graph" or "compile"d
    (neollm/decode_graph.py). "auto": "cuda_graph" on CUDA (falling back to "dynamic" with a
    warning if the capture fails), "dynamic" elsewhere. The prompt is always prefilled by
    ``forward_step``."""

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {self.min_length}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}; got {self.decode_mode!r}")
        if not self.use_cache and self.decode_mode not in ("auto", "dynamic"):
            raise ValueError(f"decode_mode {self.decode_mode!r} decodes with the cache; drop use_cache=False "
                             "(--no-cache) or use decode_mode 'auto'")


def filter_logits(logits: Tensor, cfg: SamplingConfig, seen: Tensor | None = None,
                  n_generated: int = 0) -> Tensor:
    """Apply repetition penalty, min_length EOS suppression, temperature, top-k, top-p to
    ``logits`` [B, vocab] (float32 copy returned; -inf marks removed tokens)."""
    logits = logits.float().clone()
    if cfg.repetition_penalty != 1.0 and seen is not None and seen.numel():
        score = logits.gather(1, seen)
        score = torch.where(score > 0, score / cfg.repetition_penalty, score * cfg.repetition_penalty)
        logits.scatter_(1, seen, score)
    if cfg.eos_id is not None and n_generated < cfg.min_length:
        logits[:, cfg.eos_id] = float("-inf")
    if cfg.temperature == 0:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= cfg.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def sample_next(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None,
                seen: Tensor | None = None, n_generated: int = 0) -> Tensor:
    """Next token ids [B] from last-position logits [B, vocab]."""
    filtered = filter_logits(logits, cfg, seen, n_generated)
    if cfg.temperature == 0:
        return filtered.argmax(dim=-1)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _static_decoder(model: NeoLLM, batch: int, max_len: int, mode: str, requested: str,
                    gdn_kernels: str, decoders):
    """The StaticDecoder for ``mode`` (from ``decoders``, a DecoderPool, when given), or None for
    the dynamic path: "auto" falls back to it (with a warning) when the graph capture fails."""
    from neollm.decode_graph import DecoderPool, StaticDecoder

    try:
        if isinstance(decoders, DecoderPool):
            return decoders.get(model, batch, max_len, mode, gdn_kernels)
        return StaticDecoder(model, batch, max_len, mode, gdn_kernels)
    except Exception as exc:  # noqa: BLE001 (auto: any capture/compile failure falls back)
        if requested != "auto":
            raise
        warnings.warn(f"decode_mode 'auto': the {mode} decoder failed ({exc}); decoding with the dynamic "
                      "step instead (decode_mode='dynamic' skips the attempt)", RuntimeWarning, stacklevel=3)
        return None


@torch.no_grad()
def _generate_batch(model: NeoLLM, prompt: Tensor, cfg: SamplingConfig,
                    generator: torch.Generator | None, gdn_kernels: str, mode: str,
                    decoders=None) -> list[list[int]]:
    B, P = prompt.shape
    total = P + cfg.max_new_tokens
    context = model.rope.shape[0]
    if P == 0:
        raise ValueError("empty prompt: give at least one token (e.g. BOS or EOS)")
    if total > context:
        raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({cfg.max_new_tokens}) = {total} "
                         f"exceeds the model's context of {context} tokens")
    seq = prompt
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    decoder = None
    if cfg.use_cache and mode != "dynamic" and cfg.max_new_tokens > 1:  # else no decode step runs
        decoder = _static_decoder(model, B, total, mode, cfg.decode_mode, gdn_kernels, decoders)
    if decoder is not None:
        logits = decoder.prefill(prompt)
        advance = decoder.step
    elif cfg.use_cache:
        cache = new_cache(model, total, gdn_kernels)
        logits = forward_step(model, prompt, cache)[:, -1]
        advance = lambda nxt: forward_step(model, nxt[:, None], cache)[:, -1]  # noqa: E731
    else:
        logits = model(prompt)[:, -1]
        advance = lambda nxt: model(seq)[:, -1]  # noqa: E731  (seq already holds nxt)
    for step in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, generator, seq if cfg.repetition_penalty != 1.0 else None, step)
        if cfg.eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, cfg.eos_id), nxt)
            done = done | (nxt == cfg.eos_id)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        # (the all-done check is a host sync: only when EOS can stop a sequence)
        if step == cfg.max_new_tokens - 1 or (cfg.eos_id is not None and bool(done.all())):
            break
        logits = advance(nxt)
    out = []
    for row in seq[:, P:].tolist():
        if cfg.eos_id is not None and cfg.eos_id in row:
            row = row[: row.index(cfg.eos_id) + 1]
        out.append(row)
    return out


@torch.no_grad()
def generate(model: NeoLLM, prompts: Sequence[Sequence[int]], cfg: SamplingConfig | None = None,
             gdn_kernels: str = "auto", decoders=None, **overrides) -> list[list[int]]:
    """Sample continuations of token-id prompts; returns the new ids of each prompt (ending with
    EOS when one was sampled). ``overrides`` replace fields of ``cfg`` (e.g. ``top_k=50``).

    Prompts of different lengths are decoded in groups of equal length (no padding). With a
    static ``cfg.decode_mode`` each group gets a ``decode_graph.StaticDecoder`` for
    (group size, prompt length + max_new_tokens): its CUDA graph capture / compilation is paid
    in this call unless ``decoders`` (a ``decode_graph.DecoderPool``) holds one from an earlier
    call with the same sizes."""
    from neollm.decode_graph import resolve_decode_mode

    cfg = dataclasses.replace(cfg or SamplingConfig(), **overrides)
    cfg.validate()
    device = model.tok_embeddings.weight.device
    mode = resolve_decode_mode(cfg.decode_mode, device) if cfg.use_cache else "dynamic"
    was_training = model.training
    model.eval()
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    results: list[list[int]] = [[] for _ in prompts]
    try:
        for length in sorted(groups):
            idx = groups[length]
            batch = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=device)
            for i, row in zip(idx, _generate_batch(model, batch, cfg, generator, gdn_kernels, mode, decoders)):
                results[i] = row
    finally:
        model.train(was_training)
    return results
