"""Full causal self-attention with grouped-query heads and RoPE.

Later techniques (QK norms, output gates, ...) attach here behind their own switches; with all
of them off this is the attention of a plain Llama/Qwen-style decoder.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from neollm.model.args import NeoLLMModelArgs
from neollm.model.linear import make_linear
from neollm.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, args: NeoLLMModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wq = make_linear(args.dim, q_dim, args, role="q")
        self.wk = make_linear(args.dim, kv_dim, args, role="k")
        self.wv = make_linear(args.dim, kv_dim, args, role="v")
        self.wo = make_linear(q_dim, args.dim, args, role="o")

    def init_weights(self, init_std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            linear.init_weights(init_std)
        self.wo.init_weights(out_std)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))
