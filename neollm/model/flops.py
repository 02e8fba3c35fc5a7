"""Training FLOPs per token, counted honestly for MFU.

Convention (PaLM appendix B, as torchtitan, nanoGPT and llm.c count): a matmul of an
[n, k] x [k, m] pair costs 2nkm FLOPs forward and twice that backward, so each weight costs
6 FLOPs per token; attention scores and the value mix cost 6 * 2 * T * head_dim per head per
token over the full T x T square (the causal kernel skips about half of it, so MFU computed this
way matches the others' numbers rather than the work done). Recomputation from activation
checkpointing is not counted. The tied LM head counts its 6 * dim * vocab (the embedding lookup
itself is free). Other mixers (Gated DeltaNet, ...) count their own projections and recurrence
(neollm.model.mixers: each MixerSpec.flops_per_token). LUCID adds, per KV head and token, its key Gram row
(2 T d) and the triangular solve (T d), times 3 for backward. Elementwise work (norms, gates,
FAN's sin/cos, cumsums) is not counted. A MoE FFN (mlp_type "moe") counts its ACTIVE weights only: the
router (an nn.Linear, dim * E) plus top_k experts of 3 * dim * hidden each; the inactive experts' weights do
no work for the token. Routing (softmax, top-k, sort, gather/scatter) is elementwise and not counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

if TYPE_CHECKING:  # annotations only: args.py imports this module (get_nparams_and_flops)
    from neollm.model.args import NeoLLMModelArgs


def training_flops_per_token(model: nn.Module, args: NeoLLMModelArgs, seq_len: int) -> int:
    from neollm.model.mixers import MIXERS

    codes = args.layer_types()
    other_mixers = [m for m in model.modules() if getattr(m, "mixer_code", "A") != "A"]
    inside_mixers = {id(p) for block in other_mixers for p in block.mixer.parameters()}
    linear_weights = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m.weight) not in inside_mixers
    )
    n_attention = codes.count("A")
    head = args.dim * args.vocab_size if args.tie_embeddings else 0  # untied head is a Linear
    attention_core = 6 * 2 * seq_len * args.head_dim * args.n_heads * n_attention
    mixers = sum(MIXERS[code].flops_per_token(args, seq_len) for code in codes if code != "A")
    lucid = 9 * seq_len * args.head_dim * args.n_kv_heads * n_attention if args.lucid else 0
    return 6 * (linear_weights + head + moe_active_expert_weights(model)) + attention_core + mixers + lucid


def moe_active_expert_weights(model: nn.Module) -> int:
    """Expert weights one token passes through, summed over the MoE layers (top_k of each layer's experts)."""
    from neollm.model.moe import MoE

    return sum(
        m.top_k * sum(p[0].numel() for p in (m.experts.w1, m.experts.w2, m.experts.w3))
        for m in model.modules() if isinstance(m, MoE)
    )
