"""Token mixers other than full attention, by layer-pattern code.

``layer_pattern`` (NeoLLMModelArgs) names one mixer per layer with a single character. "A" is
full attention (neollm.model.attention, built by the block itself: it takes the RoPE table and
the attention technique switches). Every other code is registered here with a builder, a
training-FLOPs count for MFU, and whether it runs on CPU. A mixer module maps [B, T, D] to
[B, T, D], is meta-device friendly (the trainer builds on ``meta``, then ``to_empty`` and
``init_weights(init_std, out_std)``), and is causal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class MixerSpec:
    name: str
    """Human name (for messages and tables)."""
    build: Callable[..., nn.Module]
    """build(args, layer_id) -> module."""
    flops_per_token: Callable[..., int]
    """flops_per_token(args, seq_len) -> training (fwd + bwd) FLOPs per token of one layer,
    its projections included (neollm.model.flops's convention)."""
    cpu: bool = True
    """False: the mixer needs CUDA (Triton kernels with no cheap reference); building it is
    fine anywhere, running it on CPU raises a clear error."""


def _gdn_build(args, layer_id: int) -> nn.Module:
    from neollm.model.mixers.deltanet import GatedDeltaNet

    return GatedDeltaNet(
        dim=args.dim, num_heads=args.gdn_num_heads, head_dim=args.gdn_head_dim,
        expand_v=args.gdn_expand_v, conv_size=args.gdn_conv_size, norm_eps=args.norm_eps,
        backend=args.gdn_backend, layer_idx=layer_id,
    )


def _gdn_flops(args, seq_len: int) -> int:
    from neollm.model.mixers.deltanet import gdn_flops_per_token

    return gdn_flops_per_token(args.dim, args.gdn_num_heads, args.gdn_head_dim,
                               args.gdn_expand_v, args.gdn_conv_size)


def _gla_build(args, layer_id: int) -> nn.Module:
    from neollm.model.mixers.gla import GatedLinearAttention

    return GatedLinearAttention(
        dim=args.dim, num_heads=args.gdn_num_heads, head_k_dim=args.gdn_head_dim,
        head_v_dim=_gdn_v(args), gate_low_rank_dim=args.gla_gate_low_rank_dim, norm_eps=args.norm_eps,
        backend=args.gdn_backend, layer_idx=layer_id,
    )


def _gla_flops(args, seq_len: int) -> int:
    from neollm.model.mixers.gla import gla_flops_per_token

    return gla_flops_per_token(args.dim, args.gdn_num_heads, args.gdn_head_dim, _gdn_v(args),
                               args.gla_gate_low_rank_dim)


def _retnet_build(args, layer_id: int) -> nn.Module:
    from neollm.model.mixers.retnet import MultiScaleRetention

    return MultiScaleRetention(
        dim=args.dim, num_heads=args.gdn_num_heads, head_k_dim=args.gdn_head_dim, head_v_dim=_gdn_v(args),
        norm_eps=args.norm_eps, backend=args.gdn_backend, layer_idx=layer_id,
    )


def _retnet_flops(args, seq_len: int) -> int:
    from neollm.model.mixers.retnet import retnet_flops_per_token

    return retnet_flops_per_token(args.dim, args.gdn_num_heads, args.gdn_head_dim, _gdn_v(args))


def _mamba2_build(args, layer_id: int) -> nn.Module:
    from neollm.model.mixers.mamba2 import Mamba2

    return Mamba2(
        dim=args.dim, head_dim=args.mamba2_head_dim, state_size=args.mamba2_state_size,
        expand=args.mamba2_expand, conv_size=args.gdn_conv_size, norm_eps=args.norm_eps,
        backend=args.gdn_backend, layer_idx=layer_id,
    )


def _mamba2_flops(args, seq_len: int) -> int:
    from neollm.model.mixers.mamba2 import mamba2_flops_per_token

    return mamba2_flops_per_token(args.dim, args.mamba2_head_dim, args.mamba2_state_size, args.mamba2_expand,
                                  args.gdn_conv_size)


def _gdn_v(args) -> int:
    return int(round(args.gdn_head_dim * args.gdn_expand_v))


# Sizes: G and T reuse the Gated DeltaNet head fields (gdn_num_heads heads, key gdn_head_dim, value
# gdn_head_dim * gdn_expand_v), so D, G and T layers carry the same recurrent state; M has its own
# mamba2_* fields and reuses gdn_conv_size. gdn_backend picks fla / torch for all four.
def _rwkv6_build(args, layer_id: int) -> nn.Module:
    from neollm.model.mixers.rwkv6 import RWKV6

    return RWKV6(
        dim=args.dim, num_heads=args.n_heads, head_dim=args.head_dim,
        proj_low_rank_dim=args.rwkv_proj_low_rank_dim, gate_low_rank_dim=args.rwkv_gate_low_rank_dim,
        norm_eps=args.norm_eps, backend=args.rwkv_backend, layer_idx=layer_id,
    )


def _rwkv6_flops(args, seq_len: int) -> int:
    from neollm.model.mixers.rwkv6 import rwkv6_flops_per_token

    return rwkv6_flops_per_token(args.dim, args.n_heads, args.head_dim,
                                 args.rwkv_proj_low_rank_dim, args.rwkv_gate_low_rank_dim)


def _recurrent_build(kind: str) -> Callable[..., nn.Module]:
    def build(args, layer_id: int) -> nn.Module:
        from neollm.model.mixers.rnn import RecurrentMixer, rnn_hidden_size

        return RecurrentMixer(kind, args.dim, rnn_hidden_size(kind, args))

    return build


def _recurrent_flops(kind: str) -> Callable[..., int]:
    def flops(args, seq_len: int) -> int:
        from neollm.model.mixers.rnn import rnn_flops_per_token, rnn_hidden_size

        return rnn_flops_per_token(kind, args.dim, rnn_hidden_size(kind, args))

    return flops


MIXERS: dict[str, MixerSpec] = {
    "D": MixerSpec("Gated DeltaNet", _gdn_build, _gdn_flops),
    "G": MixerSpec("Gated Linear Attention", _gla_build, _gla_flops),
    "T": MixerSpec("RetNet (multi-scale retention)", _retnet_build, _retnet_flops),
    "M": MixerSpec("Mamba2", _mamba2_build, _mamba2_flops),
}
# RWKV-6 time mixing (heads and head size are attention's n_heads / head_dim) and the recurrent baselines.
MIXERS["R"] = MixerSpec("RWKV-6", _rwkv6_build, _rwkv6_flops)
MIXERS["L"] = MixerSpec("LSTM", _recurrent_build("lstm"), _recurrent_flops("lstm"))
MIXERS["N"] = MixerSpec("Elman RNN (tanh)", _recurrent_build("rnn"), _recurrent_flops("rnn"))


def build_mixer(code: str, args, layer_id: int) -> nn.Module:
    """The non-attention mixer for ``code`` (a key of MIXERS)."""
    return MIXERS[code].build(args, layer_id)
