"""The ``neollm`` TrainSpec: which model, parallelism, data, tokenizer, loss and optimizer the
torchtitan trainer uses when a TOML says ``[model] name = "neollm"``."""

from __future__ import annotations

from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec

from neollm.data.loader import build_neollm_dataloader
from neollm.data.validation import build_neollm_validator
from neollm.loss import build_neollm_loss
from neollm.model.args import FLAVORS
from neollm.model.model import NeoLLM
from neollm.optim import build_neollm_lr_schedulers, build_neollm_optimizers
from neollm.parallelize import parallelize_neollm
from neollm.tokenizer import build_neollm_tokenizer

SPEC_NAME = "neollm"


def neollm_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=NeoLLM,
        model_args=FLAVORS,
        parallelize_fn=parallelize_neollm,
        pipelining_fn=None,
        build_optimizers_fn=build_neollm_optimizers,
        build_lr_schedulers_fn=build_neollm_lr_schedulers,
        build_dataloader_fn=build_neollm_dataloader,
        build_tokenizer_fn=build_neollm_tokenizer,
        build_loss_fn=build_neollm_loss,
        build_validator_fn=build_neollm_validator,
    )


def register() -> None:
    """Register the spec once (importing ``neollm`` calls this)."""
    try:
        get_train_spec(SPEC_NAME)
    except ValueError:
        register_train_spec(SPEC_NAME, neollm_train_spec())
