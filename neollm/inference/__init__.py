"""Cached decoding and sampling for NeoLLM (the inference side; training never imports it).

Modules, each with one job and no import back up the list:
* ``cache``: ``DecodeCache`` (one mixer state per layer, from ``block.mixer.new_state``), ``new_cache``,
  ``allocate_cache``;
* ``step``: ``forward_step`` (T >= 1 tokens at an int position: prefill, dynamic decoding) and
  ``static_step`` (one token at a device-tensor position: CUDA-graph capturable), thin loops over the
  blocks calling each mixer's ``step``;
* ``sampling``: ``SamplingConfig``, ``DECODE_MODES``, ``filter_logits``, ``sample_next``;
* ``decoder``: ``StaticDecoder`` (the static step eager, as a CUDA graph or compiled), ``DecoderPool``,
  ``resolve_decode_mode``;
* ``generate``: ``generate`` (prompts grouped by length, prefill, per-token steps, sampling);
* ``text``: ``prompt_ids``, ``generate_text`` (tokenizer in and out, timed: tools/generate.py's core).
The per-mixer incremental formulas live beside each mixer (``Attention.step``, ``GatedDeltaNet.step``, ...).
"""

from neollm.inference.cache import DecodeCache, allocate_cache, new_cache
from neollm.inference.decoder import DecoderPool, StaticDecoder
from neollm.inference.generate import generate
from neollm.inference.sampling import DECODE_MODES, SamplingConfig, filter_logits, sample_next
from neollm.inference.step import forward_step, static_step

__all__ = [
    "SamplingConfig", "generate", "forward_step", "static_step", "new_cache", "allocate_cache", "DecodeCache",
    "StaticDecoder", "DecoderPool", "filter_logits", "sample_next", "DECODE_MODES",
]
