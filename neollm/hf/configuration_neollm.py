"""NeoLLM's transformers config: every ``NeoLLMModelArgs`` field, under its own name.

Copied into exported folders by tools/convert_to_hf.py (config.json's ``auto_map`` points here).
It imports the installed ``neollm`` package (``pip install neollm``) for the field list and
defaults, so a config always carries exactly the fields of the neollm version that reads it.
HF's generic names (``hidden_size``, ``num_hidden_layers``, ...) are aliases of NeoLLM's
(``attribute_map``); ``tie_word_embeddings`` mirrors ``tie_embeddings``.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from neollm.model.args import NeoLLMModelArgs

# The model's fields (torchtitan's BaseModelArgs adds a private ``_enforced`` marker: skipped).
MODEL_ARG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(NeoLLMModelArgs)
                      if f.init and not f.name.startswith("_")}
REQUIREMENT = "pip install neollm (the model code is the installed neollm package, neollm.model)"


class NeoLLMConfig(PretrainedConfig):
    model_type = "neollm"
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "ffn_hidden_dim",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
        "initializer_range": "init_std",
    }

    def __init__(self, **kwargs):
        hf_tie = kwargs.pop("tie_word_embeddings", None)
        if hf_tie is not None and "tie_embeddings" not in kwargs:
            kwargs["tie_embeddings"] = bool(hf_tie)  # set through HF's generic name only
        for name, default in MODEL_ARG_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        kwargs.setdefault("use_cache", False)  # no HF KV cache: generate() recomputes the prefix
        kwargs.setdefault("neollm_requires", REQUIREMENT)
        super().__init__(tie_word_embeddings=self.tie_embeddings, **kwargs)

    @classmethod
    def from_model_args(cls, args: NeoLLMModelArgs, **kwargs) -> "NeoLLMConfig":
        values = {name: getattr(args, name) for name in MODEL_ARG_DEFAULTS}
        return cls(**values, **kwargs)

    def to_model_args(self) -> NeoLLMModelArgs:
        """The ``NeoLLMModelArgs`` this config describes (validated by its ``__post_init__``)."""
        return NeoLLMModelArgs(**{name: getattr(self, name) for name in MODEL_ARG_DEFAULTS})
