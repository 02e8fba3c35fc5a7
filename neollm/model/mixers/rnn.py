"""Classic recurrent baselines as token mixers: LSTM (Hochreiter & Schmidhuber 1997) and the Elman RNN (tanh).

Seed 003 benchmarked LSTM and plain RNN mixers next to attention and fla's linear-attention layers. Here each
is ``torch.nn.LSTM`` / ``torch.nn.RNN(nonlinearity='tanh')`` (one layer, batch_first; cuDNN on CUDA, the ATen
kernel on CPU) followed by a bias-free output projection from the hidden size back to ``dim``:

    h_1..T = RNN(x_1..T)  (zero initial state),   y_t = W_o h_t

Causal by construction (h_t depends on x_1..t only). Hidden size: ``rnn_hidden_dim`` when set, else the
largest multiple of 8 whose mixer parameter count (recurrent weights and both bias vectors, plus W_o) does not
exceed an attention layer's q/k/v/o weights, D (2 n_heads + 2 n_kv_heads) head_dim — so a "L" or "N" layer
costs about what the "A" layer it replaces did. At D=512, 8 heads, 4 KV heads of 64 (786,432 attention
weights) this gives LSTM H=224 (775,936 params) and RNN H=504 (771,120 params).

The recurrent call runs under ``torch.compiler.disable``: dynamo graph-breaks on nn.RNN modules anyway
(``torch._dynamo.config.allow_rnn`` is off by default), and an explicit break keeps the rest of the block
compiled (non-attention blocks compile with fullgraph=False). Recurrent weights keep PyTorch's default
init U(-1/sqrt(H), 1/sqrt(H)) (also the weights' cuDNN layout is refreshed by ``nn.RNNBase._apply`` after
``to_empty``); W_o ~ N(0, out_std) like every residual-branch output. cuDNN may warn that the weights are not
one contiguous chunk (FSDP2 swaps in freshly gathered tensors each step): it then packs them per call, a copy
of the layer's few MB of weights, small next to the recurrence itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["RecurrentMixer", "rnn_hidden_size", "rnn_params", "rnn_flops_per_token"]

_GATES = {"lstm": 4, "rnn": 1}


def rnn_params(kind: str, dim: int, hidden: int) -> int:
    """Parameters of the mixer: G gate blocks of (W_ih [H, D], W_hh [H, H], b_ih, b_hh [H]) plus W_o [D, H]."""
    gates = _GATES[kind]
    return gates * (hidden * dim + hidden * hidden + 2 * hidden) + dim * hidden


def rnn_hidden_size(kind: str, args) -> int:
    """``args.rnn_hidden_dim`` if set, else the largest multiple of 8 with rnn_params <= attention's weights."""
    if args.rnn_hidden_dim:
        return args.rnn_hidden_dim
    budget = args.dim * args.head_dim * 2 * (args.n_heads + args.n_kv_heads)
    gates, dim = _GATES[kind], args.dim
    # gates * H^2 + (gates * (D + 2) + D) H - budget = 0
    b = gates * (dim + 2) + dim
    h = int((-b + math.sqrt(b * b + 4 * gates * budget)) / (2 * gates)) // 8 * 8
    while h > 8 and rnn_params(kind, dim, h) > budget:
        h -= 8
    return max(h, 8)


class RecurrentMixer(nn.Module):
    """One-layer LSTM or tanh RNN over time, then W_o back to ``dim``: [B, T, D] -> [B, T, D]."""

    def __init__(self, kind: str, dim: int, hidden: int) -> None:
        super().__init__()
        if kind not in _GATES:
            raise ValueError(f"kind must be one of {tuple(_GATES)}, got {kind!r}")
        self.kind = kind
        self.hidden = hidden
        if kind == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(dim, hidden, batch_first=True)
        else:
            self.rnn = nn.RNN(dim, hidden, nonlinearity="tanh", batch_first=True)
        self.o_proj = nn.Linear(hidden, dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_std: float = 0.02, out_std: float | None = None) -> None:
        """Recurrent weights: PyTorch's default U(+-1/sqrt(H)); W_o ~ N(0, out_std or init_std)."""
        stdv = 1.0 / math.sqrt(self.hidden)
        for p in self.rnn.parameters():
            nn.init.uniform_(p, -stdv, stdv)
        nn.init.normal_(self.o_proj.weight, mean=0.0, std=out_std if out_std is not None else init_std)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"expected x of shape [B, T, D], got {tuple(x.shape)}")
        return self.o_proj(_run_rnn(self.rnn, x))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, hidden={self.hidden}"


@torch.compiler.disable
def _run_rnn(rnn: nn.RNNBase, x: Tensor) -> Tensor:
    """The recurrent layer's outputs h_1..T (zero initial state), outside torch.compile's graph."""
    out, _ = rnn(x)
    return out


def rnn_flops_per_token(kind: str, dim: int, hidden: int) -> int:
    """Training FLOPs per token: 6 per weight (gates * H (D + H) recurrent + D H output); elementwise not counted."""
    return 6 * (_GATES[kind] * hidden * (dim + hidden) + dim * hidden)
