"""The layer layout fla's GLA and RetNet share, so each mixer only adds its own gate and kernel.

q, k, v projections to H heads (key size K, value size V), the output gate ``g_proj``, ``o_proj``
and the swish-gated RMSNorm over each head's value (``g_norm_swish_gate``), with fla's parameter
names, registered in fla's order (a mixer's own gate parameters between ``g_proj`` and ``o_proj``)
so state dicts load either way.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from neollm.model.mixers.common import GatedRMSNorm
from neollm.model.mixers.common import check_backend


class GatedHeadsMixer(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_k_dim: int, head_v_dim: int, norm_eps: float,
                 backend: str, layer_idx: int | None, gates: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        check_backend(backend)
        self.hidden_size = dim
        self.num_heads = num_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.key_dim, self.value_dim = num_heads * head_k_dim, num_heads * head_v_dim
        self.norm_eps = norm_eps
        self.backend = backend
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.value_dim, bias=False)
        self.g_proj = nn.Linear(dim, self.value_dim, bias=False)
        for name, module in (gates or {}).items():
            self.add_module(name, module)
        self.o_proj = nn.Linear(self.value_dim, dim, bias=False)
        self.g_norm_swish_gate = GatedRMSNorm(head_v_dim, eps=norm_eps)

    @torch.no_grad()
    def _init_gated_heads(self, init_std: float, out_std: float | None, *gate_linears: nn.Linear) -> None:
        """q/k/v/g and the mixer's gate Linears ~ N(0, init_std), o_proj ~ N(0, out_std or init_std),
        norm weight 1 (fla's model init: every Linear normal)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, *gate_linears):
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.o_proj.weight, mean=0.0, std=out_std if out_std is not None else init_std)
        self.g_norm_swish_gate.reset_parameters()

    def extra_repr(self) -> str:
        return (f"dim={self.hidden_size}, num_heads={self.num_heads}, head_k_dim={self.head_k_dim}, "
                f"head_v_dim={self.head_v_dim}, backend={self.backend!r}")
