"""Periodic validation loss for NeoLLM runs: torchtitan's Validator, made to work with NeoLLM.

torchtitan 0.2.2's ``Validator`` (``[validation] enable / dataset / dataset_path / freq / steps /
local_batch_size / seq_len``) needs two changes for the ``neollm`` model:

* its ``post_dataloading_process`` asks every model for attention masks and only tolerates a
  TypeError; NeoLLM (causal SDPA / Gated DeltaNet, no flex attention) raises
  NotImplementedError, so validation would crash at its first batch. Masks are requested here
  only for ``attn_type`` "flex"/"varlen", as torchtitan's Trainer does;
* NeoLLM computes its loss inside the model from the hidden states (neollm/loss/); the labels
  are handed to the model as in ``NeoLLMTrainer.post_dataloading_process``, so validation does not
  materialise [batch x seq x vocab] logits either.

Its dataloader is NeoLLM's (neollm.data.loader.build_neollm_validation_dataloader): any NeoLLM
source (``wiki_vital_en_validation``, ``shards_validation``, ``local_text``...), split over the
data-parallel ranks, restarted at every evaluation so each reports the loss on the same tokens.
The loss is logged by torchtitan's metrics processor ("validate step: N  loss: X", and
``validation_metrics/loss`` in TensorBoard / W&B) next to the training metrics.

``build_neollm_validator`` is the TrainSpec's ``build_validator_fn``. torchtitan's Validator
builds its dataloader by calling the module-level name ``build_text_validation_dataloader`` in
its ``__init__``; :func:`install` points that name at NeoLLM's builder (the one hook torchtitan
0.2.2 offers for it).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn as nn
from torchtitan.components.validate import Validator
from torchtitan.distributed.context_parallel import prepare_context_parallel_input
from torchtitan.protocols import ModelProtocol


class NeoLLMValidator(Validator):
    def post_dataloading_process(self, input_dict: dict[str, torch.Tensor], labels: torch.Tensor,
                                 model_parts: list[nn.Module]):
        inputs = input_dict["input"]
        extra_inputs: dict[str, Any] = {k: v for k, v in input_dict.items() if k != "input"}
        extra_kwargs: dict[str, Any] = {}
        model = model_parts[0]
        if getattr(getattr(model, "model_args", None), "attn_type", "sdpa") in ("flex", "varlen"):
            extra_kwargs["attention_masks"] = cast(ModelProtocol, model).get_attention_masks(
                input_batch=inputs, tokenizer=self.tokenizer, extra_inputs=extra_inputs)
        if self.parallel_dims.cp_enabled:
            inputs, labels, extra_kwargs = prepare_context_parallel_input(
                inputs, labels, extra_kwargs, self.parallel_dims.get_mesh("cp"), inputs.device,
                self.job_config.parallelism.context_parallel_load_balancer)
        if self.job_config.model.name == "neollm":
            extra_inputs["labels"] = labels  # the model returns the summed loss
        return inputs, labels, extra_inputs, extra_kwargs


def build_neollm_validator(job_config, dp_world_size, dp_rank, tokenizer, parallel_dims, loss_fn,
                           validation_context, maybe_enable_amp, metrics_processor=None,
                           pp_schedule=None, pp_has_first_stage=None, pp_has_last_stage=None):
    """TrainSpec ``build_validator_fn`` (same arguments as torchtitan's build_validator)."""
    install()
    assert metrics_processor is not None
    return NeoLLMValidator(
        job_config=job_config, dp_world_size=dp_world_size, dp_rank=dp_rank, tokenizer=tokenizer,
        parallel_dims=parallel_dims, loss_fn=loss_fn, validation_context=validation_context,
        maybe_enable_amp=maybe_enable_amp, metrics_processor=metrics_processor,
        pp_schedule=pp_schedule, pp_has_first_stage=pp_has_first_stage,
        pp_has_last_stage=pp_has_last_stage)


def install() -> None:
    """Make torchtitan's Validator build NeoLLM's validation dataloader (idempotent)."""
    import torchtitan.components.validate as validate

    from neollm.data.loader import build_neollm_validation_dataloader

    validate.build_text_validation_dataloader = build_neollm_validation_dataloader
