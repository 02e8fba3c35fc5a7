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

Decode state (``new_state`` / ``step``): ``RecurrentState.h`` [1, B, H] (and ``c`` [1, B, H] for the LSTM's cell)
in the compute dtype (fp32, fp64 kept; zeros = the training forward's zero initial state). A step of any T calls
the same nn.LSTM / nn.RNN with (h0, c0) cast to the input's dtype (cuDNN on CUDA, ATen on CPU) and copies the
final state back: nn.LSTM returns h and c in the input's dtype, so an fp32 state holds a bf16 model's exactly
(its forward over a whole sequence may carry c more precisely inside cuDNN: equal up to bf16 rounding). On CUDA
a T = 1 step is one cuDNN inference call, which passes no sequence-length array to the device (no host sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from neollm.model.mixers.common import check_decode_kernels, state_dtype

__all__ = ["RecurrentMixer", "RecurrentState", "rnn_hidden_size", "rnn_params", "rnn_flops_per_token"]

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


@dataclass
class RecurrentState:
    """An LSTM / RNN layer's decode state: hidden h [1, B, H] and, for the LSTM, cell c [1, B, H] (compute dtype);
    written in place by ``step``."""

    h: Tensor
    c: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        return [self.h] if self.c is None else [self.h, self.c]


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

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device, kernels: str = "auto"
                  ) -> RecurrentState:
        """Zero decode state for ``batch`` sequences. ``kernels`` is only validated: nn.LSTM / nn.RNN run
        on both devices ("fla" has no kernel here, so on a CPU device it is refused like everywhere else)."""
        check_decode_kernels(kernels, device, "RecurrentMixer")
        zeros = lambda: torch.zeros(1, batch, self.hidden, dtype=state_dtype(dtype), device=device)  # noqa: E731
        return RecurrentState(zeros(), zeros() if self.kind == "lstm" else None)

    def step(self, x: Tensor, state: RecurrentState, pos=None, rope: Tensor | None = None) -> Tensor:
        """x [B, T, D] of the next T tokens -> [B, T, D], the full forward's rows there; state updated in place
        (pos and rope unused)."""
        h0 = state.h.to(x.dtype)
        hx = h0 if state.c is None else (h0, state.c.to(x.dtype))
        out, hn = _run_rnn_from(self.rnn, x, hx)
        if state.c is None:
            state.h.copy_(hn)
        else:
            state.h.copy_(hn[0])
            state.c.copy_(hn[1])
        return self.o_proj(out)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, hidden={self.hidden}"


@torch.compiler.disable
def _run_rnn(rnn: nn.RNNBase, x: Tensor) -> Tensor:
    """The recurrent layer's outputs h_1..T (zero initial state), outside torch.compile's graph."""
    out, _ = rnn(x)
    return out


@torch.compiler.disable
def _run_rnn_from(rnn: nn.RNNBase, x: Tensor, hx) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    """The recurrent layer from initial state ``hx`` (h0, or (h0, c0) for the LSTM): (outputs, final state)."""
    return rnn(x, hx)


def rnn_flops_per_token(kind: str, dim: int, hidden: int) -> int:
    """Training FLOPs per token: 6 per weight (gates * H (D + H) recurrent + D H output); elementwise not counted."""
    return 6 * (_GATES[kind] * hidden * (dim + hidden) + dim * hidden)
