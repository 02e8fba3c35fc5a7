"""Writing a whole initial value into a parameter that FSDP2 may have sharded.

Under ``fully_shard`` (any run with more than one data-parallel rank) parameters are DTensors
when ``init_weights`` runs, and ``param.copy_(plain_tensor)`` fails ("mixed torch.Tensor and
DTensor"). Inits that build a full matrix (an identity, an orthogonal matrix) go through here:
the full value is distributed with the parameter's own mesh and placements, so each rank keeps
its shard of the same matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def copy_full_(param: Tensor, full: Tensor) -> None:
    """``param.copy_(full)`` for a plain or DTensor ``param``; ``full`` has the parameter's whole shape."""
    if param.is_meta:
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"initial value of shape {tuple(full.shape)} for a parameter of shape {tuple(param.shape)}")
    full = full.to(dtype=param.dtype, device=param.device)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements)
    param.copy_(full)
