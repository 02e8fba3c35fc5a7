"""Text in, text out around ``generate`` (tools/generate.py is the command line): prompts encoded
as training sees a document's start, continuations decoded without the final EOS, the run timed.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from neollm.inference.decoder import resolve_decode_mode
from neollm.inference.generate import generate
from neollm.inference.sampling import SamplingConfig
from neollm.tokenizer import start_id


def prompt_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text with BOS (if the tokenizer has one), no EOS; an empty text is the start id alone."""
    prompts = []
    for text in texts:
        ids = tokenizer.encode(text, add_bos=True, add_eos=False) if text else []
        prompts.append(ids or [start_id(tokenizer)])
    return prompts


def generate_text(model: torch.nn.Module, tokenizer, texts: Sequence[str], cfg: SamplingConfig, kernels: str,
                  device: str) -> tuple[list[str], int, float, str]:
    """(each text's continuation, new tokens in all, seconds, decode mode used); the time includes
    any CUDA-graph capture or compilation."""
    prompts = prompt_ids(tokenizer, texts)
    mode = resolve_decode_mode(cfg.decode_mode, device) if cfg.use_cache else "uncached"
    start = time.perf_counter()
    outputs = generate(model, prompts, cfg, kernels=kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    continuations = []
    for new in outputs:
        if cfg.eos_id is not None and new and new[-1] == cfg.eos_id:
            new = new[:-1]
        continuations.append(tokenizer.decode(new))
    return continuations, sum(len(o) for o in outputs), elapsed, mode
