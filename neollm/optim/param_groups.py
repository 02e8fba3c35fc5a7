"""Weight-decay parameter groups.

A parameter is weight-decayed only when it is a matrix (or higher-rank tensor: embeddings,
projections, convolution kernels) and does not carry ``_no_weight_decay = True``. Norm gains,
biases, scalars and other 1-D parameters are never decayed; a module flags any other parameter
that must not be decayed (e.g. Gated DeltaNet's ``A_log``/``dt_bias``, small 2-D technique
parameters) by setting ``param._no_weight_decay = True``.

The flag must sit on the parameter object the optimizer receives. FSDP2's ``fully_shard`` and
``Module.to_empty`` replace parameter objects (dropping Python attributes), so set the flag in
``init_weights`` (which torchtitan calls after sharding and ``to_empty``), as
``neollm/model/mixers/deltanet.py`` does, not in ``__init__``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch.nn as nn

NO_WEIGHT_DECAY_ATTR = "_no_weight_decay"


def decays(param: nn.Parameter) -> bool:
    """True when weight decay applies to ``param`` (its global ndim counts for DTensors)."""
    return param.ndim >= 2 and not getattr(param, NO_WEIGHT_DECAY_ATTR, False)


def split_decay(params: Iterable[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay, no_decay = [], []
    for p in params:
        (decay if decays(p) else no_decay).append(p)
    return decay, no_decay


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups (decayed matrices, undecayed rest) of the trainable parameters of ``model``.

    Empty groups are left out: DCP's optimizer state-dict code indexes each group's first
    parameter. Shared (tied) parameters appear once (``model.parameters()`` deduplicates).
    """
    decay, no_decay = split_decay(p for p in model.parameters() if p.requires_grad)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
