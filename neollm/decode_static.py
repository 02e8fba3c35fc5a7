"""The static-shape single-token decode step (T = 1) of NeoLLM's cached decoding.

``static_step(model, tokens, pos, cache)`` computes what ``neollm.generate.forward_step`` computes
for one new token per sequence, but the position is a 1-element int64 tensor on the model's
device rather than a Python int. No tensor shape depends on the position and nothing reads a
tensor's value on the host, so one call's kernels can be captured in a CUDA graph (or compiled
once) and replayed for every later position. The cache must be allocated up front
(``generate.allocate_cache``, or a prefill through ``forward_step``): the step only writes into
its tensors in place (``index_copy_`` / ``copy_``), so their addresses never change. The step
does not advance ``pos``; the caller does (``decode_graph.StaticDecoder`` inside its graph).

Per attention layer, with L = cache.max_len:
* RoPE: the row ``rope.index_select(0, pos)``;
* momentum: the previous pre-momentum q/k rows from the cache (at pos = 0 the token's own, or zeros
  with ``momentum_first = "zero"``: a ``torch.where`` on the position), then overwritten with this token's rows;
* keys / values written at ``pos``; attention over the whole [L] buffer with the boolean mask
  ``arange(L) <= pos``. The query heads of one KV group are laid along the query axis
  (``[B, Hkv, g, d]``, T = 1), so GQA needs neither ``enable_gqa`` nor a repeat of the keys;
* LUCID: ``x_new = v - P_row @ X`` with P_row the new key's row over the whole buffer, zeroed
  at positions >= pos (the unit-diagonal solve for one token is the identity);
* affine-scaled attention: the running value sum += V' (in place), count = pos + 1;
* Gated DeltaNet: ``generate._gdn_step`` itself (position-free; state and conv states copied
  in place): the torch recurrent step, or on CUDA fla's ``fused_recurrent_gated_delta_rule``
  (one Triton launch with a fixed grid and no host sync: capturable), per ``cache.gdn_kernels``.
Positions past ``pos`` hold zeros (``DecodeCache.reset``) or stale finite values; the masks
give them weight exactly 0. tests/test_decode_static.py checks the step against ``forward_step``
and the full forward for every flavor in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from neollm.generate import AttentionCache, DecodeCache, _gdn_step
from neollm.model import attention_ops as ops
from neollm.model.attention import Attention
from neollm.model.model import NeoLLM
from neollm.model.rope import apply_rope

__all__ = ["static_step"]


def _attention_static(attn: Attention, x: Tensor, rope: Tensor, c: AttentionCache, pos: Tensor) -> Tensor:
    B = x.shape[0]
    h, hkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    L = c.keys.shape[2]
    q, k, v = attn.qkv(x)  # [B, 1, H | Hkv, d]
    table = rope.index_select(0, pos)  # [1, d]
    q, k = apply_rope(q, table), apply_rope(k, table)
    if attn.momentum_gamma != 0.0:
        g = attn.momentum_gamma
        first = (pos == 0).view(())
        q0, k0 = (torch.zeros_like(q), torch.zeros_like(k)) if attn.momentum_first == "zero" else (q, k)
        prev_q, prev_k = torch.where(first, q0, c.prev_q), torch.where(first, k0, c.prev_k)
        c.prev_q.copy_(q)
        c.prev_k.copy_(k)
        q = q + g * (q - prev_q)
        k = k + g * (k - prev_k)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, 1, d]
    c.keys.index_copy_(2, pos, kt.to(c.keys.dtype))
    positions = torch.arange(L, device=x.device)
    if attn.lucid:
        kr = ops.rms_normalize(kt, attn.eps)  # [B, Hkv, 1, d], compute dtype
        c.lucid_keys.index_copy_(2, pos, kr)
        p_row = torch.exp(kr @ c.lucid_keys.transpose(-1, -2) / math.sqrt(d) - math.sqrt(d))  # [B, Hkv, 1, L]
        p_row = torch.where(positions < pos, p_row, torch.zeros((), dtype=p_row.dtype, device=x.device))
        x_new = vt.to(kr.dtype) - p_row @ c.lucid_x
        c.lucid_x.index_copy_(2, pos, x_new)
        new_values = x_new.to(vt.dtype)
    else:
        new_values = vt
    c.values.index_copy_(2, pos, new_values.to(c.values.dtype))
    mask = (positions <= pos).view(1, 1, 1, L)
    y = F.scaled_dot_product_attention(qt.reshape(B, hkv, h // hkv, d), c.keys, c.values, attn_mask=mask)
    y = y.reshape(B, 1, h, d)
    if attn.affine:
        vsum = c.value_sum + new_values[:, :, 0].to(c.value_sum.dtype)  # [B, Hkv, d]
        c.value_sum.copy_(vsum)
        mean = vsum / (pos + 1).to(vsum.dtype)
        y = attn.mix_uniform(y, x, mean.to(new_values.dtype)[:, None, :, None, :])
    return attn.finish(y, v, x)


def static_step(model: NeoLLM, tokens: Tensor, pos: Tensor, cache: DecodeCache) -> Tensor:
    """Logits [B, vocab] of ``tokens`` [B, 1] at position ``pos`` (int64 tensor of shape [1] on the
    model's device; not advanced here); the cache's tensors are updated in place, ``cache.pos``
    (the host-side count) is left to the caller. No host sync, no allocation of cache state.
    Run under ``torch.no_grad()`` with the model in eval mode."""
    h = model.tok_embeddings(tokens)
    for block, c in zip(model.layers.values(), cache.layers):
        if block.mixer_code == "A":
            mixer = lambda a, m=block.mixer, c=c: _attention_static(m, a, model.rope, c, pos)  # noqa: E731
        else:
            mixer = lambda a, m=block.mixer, c=c: _gdn_step(m, a, c, cache.gdn_kernels)  # noqa: E731
        h = block(h, model.rope, mixer=mixer)
    return F.linear(model.norm(h[:, 0]), model.head_weight())
