"""``NeoLLMForCausalLM``: NeoLLM behind transformers' ``PreTrainedModel`` API.

Copied into exported folders by tools/convert_to_hf.py (config.json's ``auto_map`` points here).
The network is the installed package's ``neollm.model.model.NeoLLM``, held unchanged as
``self.model``: the exported folder needs ``pip install neollm`` (transformers says so when it is
missing), and its logits are NeoLLM's own. Parameter names are NeoLLM's under ``model.``
(``model.tok_embeddings.weight``, ``model.layers.0.attention.wq.weight``, ...).

Tied embeddings: with ``tie_embeddings`` (``tie_word_embeddings`` in the config) NeoLLM has a
single matrix, ``tok_embeddings.weight``, which its head multiplies by directly; there is no
second parameter for transformers to tie, so ``_tied_weights_keys`` is empty and the safetensors
file holds the matrix once. Untied models have ``model.output.weight``.

Generation: ``generate()`` works through transformers' generic loop without a KV cache
(``use_cache=False``; each step re-runs the prefix). NeoLLM has no padding mask: batches must be
unpadded (an ``attention_mask`` with zeros is refused). For cached decoding (KV cache and
Gated DeltaNet state) use ``neollm.inference``, which takes this model's ``.model``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput
from transformers.utils import logging as hf_logging

from neollm.checkpoint import shape_mismatches
from neollm.hf.weights import read_stored, stored_shapes
from neollm.model.model import NeoLLM

from .configuration_neollm import NeoLLMConfig


def _older_layout_names(path, kwargs: dict) -> tuple[Path, list[str]] | None:
    """(folder, names) of the parameters a local export stores in an older layout, when every other one fits
    (else None: transformers reports what does not fit, and hub ids, variants and other files are its own)."""
    if path is None or kwargs.get("variant") or kwargs.get("state_dict") is not None:
        return None
    folder = Path(path) / kwargs.get("subfolder", "")
    config = kwargs.get("config")
    if not (folder / "config.json").is_file() and not isinstance(config, NeoLLMConfig):
        return None
    try:
        stored = stored_shapes(folder)
    except FileNotFoundError:
        return None
    if not isinstance(config, NeoLLMConfig):
        config = NeoLLMConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        expected = {f"model.{k}": tuple(v.shape) for k, v in NeoLLM(config.to_model_args()).state_dict().items()}
    missing, wrong, older = shape_mismatches(expected, stored)
    return (folder, older) if older and not (missing or wrong) else None


class NeoLLMPreTrainedModel(PreTrainedModel):
    config_class = NeoLLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = None  # see the module docstring
    supports_gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loader. A local export holding parameters in an older layout (one a reshape loads:
        neollm/hf/weights.py) loads with transformers told to leave those parameters alone (as mismatched),
        which are then filled from the file, reshaped. The Auto classes run the export's own copy of this
        file: an export written before such a change loads through this class
        (``neollm.hf.NeoLLMForCausalLM.from_pretrained``), or by the Auto classes once the installed package's
        neollm/hf/modeling_neollm.py is copied over the folder's."""
        found = _older_layout_names(pretrained_model_name_or_path, kwargs)
        if found is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        folder, names = found
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its "newly initialized, shapes did not match" report: filled below
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                             **{**kwargs, "ignore_mismatched_sizes": True})
        finally:
            hf_logging.set_verbosity(verbosity)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        with torch.no_grad():
            for name, tensor in read_stored(folder, names).items():
                param = model.get_parameter(name)
                param.copy_(tensor.reshape(param.shape))
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """NeoLLM initialises itself: a fresh model gets ``NeoLLM.init_weights``; a loaded one
        (every parameter read from the checkpoint) only gets its non-persistent buffers rebuilt (RoPE's
        table, the LNS constants: transformers' loader leaves them uninitialised)."""
        if not isinstance(module, NeoLLM):
            return
        device = module.tok_embeddings.weight.device
        if device.type == "meta":
            return
        if not any(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
            module.init_weights(buffer_device=device)
        module.init_buffers(device)


class NeoLLMForCausalLM(NeoLLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: NeoLLMConfig) -> None:
        super().__init__(config)
        self.model = NeoLLM(config.to_model_args())
        self.post_init()

    # ---- embeddings --------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.output  # None when tied: the head is tok_embeddings.weight

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """input_ids [B, T] -> logits [B, T, vocab]. With ``labels`` (the input ids, or -100 to
        ignore; shifted here, HF's convention) also the mean next-token cross-entropy."""
        if input_ids is None:
            raise ValueError("NeoLLMForCausalLM needs input_ids (inputs_embeds is not supported)")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("NeoLLMForCausalLM does not take inputs_embeds; pass input_ids")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "NeoLLM has no padding mask (positions, momentum attention, LUCID and Gated "
                "DeltaNet state would see the padding): pass unpadded sequences of equal length, "
                "or generate prompt by prompt")
        if past_key_values is not None:
            raise ValueError("NeoLLMForCausalLM keeps no HF cache: call with use_cache=False "
                             "(or use neollm.inference for cached decoding)")
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1],
                                      **kwargs)
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        else:
            logits = logits[:, logits_to_keep]
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask=None, **kwargs):
        """The whole sequence every step (no cache)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
