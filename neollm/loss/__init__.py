"""The language-model loss, in one package.

* ``settings``: the ``[loss]`` choices (``LossSettings``, ``LOSS_IMPLS``, ``IGNORE_INDEX``);
* ``linear_ce``: the loss from the hidden states and the head weight (Cut Cross-Entropy, fused,
  chunked, whole logits; z-loss) and the TrainSpec loss function;
* ``fused_linear_ce``: the fused linear + cross-entropy (gradient formed in the forward pass);
* ``kernel``: its per-chunk softmax / gradient step as one Triton kernel.

The rest of the code imports the public names from here.
"""

from neollm.loss.linear_ce import (
    build_neollm_loss,
    cce_token_nll,
    chunked_token_nll,
    linear_cross_entropy_sum,
    logits_cross_entropy_sum,
    logits_loss_sum,
    neollm_loss,
)
from neollm.loss.settings import IGNORE_INDEX, LOSS_IMPLS, LossSettings

__all__ = [
    "IGNORE_INDEX",
    "LOSS_IMPLS",
    "LossSettings",
    "build_neollm_loss",
    "cce_token_nll",
    "chunked_token_nll",
    "linear_cross_entropy_sum",
    "logits_cross_entropy_sum",
    "logits_loss_sum",
    "neollm_loss",
]
