"""NeoLLM's optimizers and LR schedule for torchtitan's trainer.

* :class:`AdEMAMix` (seed 000) and :class:`Conda` (seed 001), DTensor/FSDP2-aware;
* :func:`build_neollm_optimizers`: the TrainSpec's ``build_optimizers_fn`` (AdamW, Adam,
  AdEMAMix, Conda; weight decay only on un-flagged matrices);
* :func:`build_neollm_lr_schedulers`: the TrainSpec's ``build_lr_schedulers_fn`` (torchtitan's
  schedule, or warm-up from ``start_lr_factor`` x lr then decay to ``min_lr_factor`` x lr).
"""

from neollm.optim.ademamix import AdEMAMix
from neollm.optim.builder import NeoLLMOptimizersContainer, build_neollm_optimizers
from neollm.optim.conda import Conda
from neollm.optim.param_groups import build_param_groups
from neollm.optim.schedule import build_neollm_lr_schedulers, warmup_decay_factor

__all__ = [
    "AdEMAMix",
    "Conda",
    "NeoLLMOptimizersContainer",
    "build_neollm_lr_schedulers",
    "build_neollm_optimizers",
    "build_param_groups",
    "warmup_decay_factor",
]
