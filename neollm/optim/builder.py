"""``build_optimizers_fn`` of the neollm TrainSpec: AdamW / Adam (torch), AdEMAMix, Conda.

Differences from torchtitan's ``build_optimizers``:

* two parameter groups per model part (``neollm.optim.param_groups``): weight decay only on
  matrices not flagged ``_no_weight_decay``. torchtitan's stock builder puts every parameter in
  one group and so also decays norm gains, biases and scalar technique parameters (pulling
  e.g. RMSNorm gains towards 0): a known deficiency this builder fixes for AdamW too;
* ``[optimizer] name`` may also be "AdEMAMix" (extra keys beta3, alpha, t_alpha, t_beta3) or
  "Conda" (conda_update_proj_gap, conda_scale, conda_correct_bias, conda_version, conda_precision,
  conda_basis); see neollm/config.py.

The container is a torchtitan ``OptimizersContainer`` (one optimizer per model part), so
checkpointing (DCP ``get/set_optimizer_state_dict``, flattened) and the LR schedulers work
unchanged; the optimizers keep all their state as tensors in ``optimizer.state[p]``.
Note: a checkpoint restores the param-group hyper-parameters it was saved with (torch's
behaviour), including each group's weight_decay; a checkpoint written by torchtitan's stock
builder (one group) therefore restores weight_decay > 0 on the no-decay group too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.distributed import ParallelDims

from neollm.errors import ConfigError
from neollm.optim.ademamix import AdEMAMix
from neollm.optim.conda import BASES as CONDA_BASES
from neollm.optim.conda import PRECISIONS as CONDA_PRECISIONS
from neollm.optim.conda import VERSIONS as CONDA_VERSIONS
from neollm.optim.conda import Conda
from neollm.optim.param_groups import build_param_groups

OPTIMIZERS = ("AdamW", "Adam", "AdEMAMix", "Conda")


class NeoLLMOptimizersContainer(OptimizersContainer):
    """torchtitan's container with weight-decay parameter groups per model part."""

    def __init__(self, model_parts: list[nn.Module], optimizer_cls: type, optimizer_kwargs: dict[str, Any]) -> None:
        weight_decay = optimizer_kwargs.get("weight_decay", 0.0)
        all_params: list[nn.Parameter] = []
        self.optimizers = []
        self.model_parts = model_parts
        for model in model_parts:
            groups = build_param_groups(model, weight_decay)
            self.optimizers.append(optimizer_cls(groups, **optimizer_kwargs))
            all_params.extend(p for group in groups for p in group["params"])
        self._validate_length(len(model_parts))
        self._post_init(all_params, optimizer_kwargs)


CONDA_SETTINGS = {
    "conda_version": (CONDA_VERSIONS, "the author's Conda_optimizer.py by commit date; neollm/optim/conda.py"),
    "conda_precision": (CONDA_PRECISIONS, "IEEE fp32 or TF32 tensor-core products in Conda's projections"),
    "conda_basis": (CONDA_BASES, "where the SVDs of Conda's basis refresh run: one by one on the device, "
                                 "batched by shape, or on the host's CPU threads"),
}


def conda_setting(config, key: str) -> str:
    """``[optimizer] <key>`` of CONDA_SETTINGS, one of its choices (the first by default), or a ConfigError
    saying what to pick (preflight's check_ranges and the builder both ask here)."""
    choices, what = CONDA_SETTINGS[key]
    value = getattr(config, key, choices[0])
    if value not in choices:
        raise ConfigError(f"[optimizer] {key} {value!r} is unknown: choose one of {', '.join(choices)} ({what})")
    return value


def optimizer_class_and_kwargs(config) -> tuple[type, dict[str, Any]]:
    """The optimizer class and its constructor arguments for an ``[optimizer]`` config."""
    name = config.name
    implementation = config.implementation
    if implementation not in ("fused", "foreach", "for-loop"):
        raise ConfigError(f"[optimizer] implementation {implementation!r}: choose fused, foreach or for-loop")
    common = {"lr": config.lr, "eps": config.eps, "weight_decay": config.weight_decay}
    if name in ("AdamW", "Adam"):
        cls = torch.optim.AdamW if name == "AdamW" else torch.optim.Adam
        return cls, {**common, "betas": (config.beta1, config.beta2),
                     "fused": implementation == "fused", "foreach": implementation == "foreach"}
    if name == "AdEMAMix":
        return AdEMAMix, {
            **common,
            "betas": (config.beta1, config.beta2, getattr(config, "beta3", 0.9999)),
            "alpha": getattr(config, "alpha", 2.0),
            "t_alpha": getattr(config, "t_alpha", 0),
            "t_beta3": getattr(config, "t_beta3", 0),
            # no fused kernel: "fused" means the foreach path
            "foreach": implementation != "for-loop",
        }
    if name == "Conda":
        return Conda, {
            **common,
            "betas": (config.beta1, config.beta2),
            "correct_bias": getattr(config, "conda_correct_bias", True),
            "update_proj_gap": getattr(config, "conda_update_proj_gap", 500),
            "scale": getattr(config, "conda_scale", 0.25),
            "version": conda_setting(config, "conda_version"),
            "precision": conda_setting(config, "conda_precision"),
            "basis": conda_setting(config, "conda_basis"),
            # batched step: "foreach" on, "for-loop" off, "fused" (no fused kernel) = on CUDA only
            "foreach": {"foreach": True, "for-loop": False}.get(implementation),
        }
    raise ConfigError(f"[optimizer] name {name!r} is unknown: choose one of {', '.join(OPTIMIZERS)}")


def build_neollm_optimizers(
    model_parts: list[nn.Module],
    optimizer_config,
    parallel_dims: ParallelDims,
    ft_manager=None,
) -> OptimizersContainer:
    if optimizer_config.early_step_in_backward:
        raise ConfigError("[optimizer] early_step_in_backward is not supported by NeoLLM's optimizers: set it false")
    if ft_manager is not None and getattr(ft_manager, "enabled", False):
        raise ConfigError("[fault_tolerance] is not supported by NeoLLM's optimizers: disable it")
    optimizer_cls, kwargs = optimizer_class_and_kwargs(optimizer_config)
    return NeoLLMOptimizersContainer(model_parts, optimizer_cls, kwargs)
