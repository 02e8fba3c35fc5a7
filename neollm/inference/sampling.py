"""Sampling: the generation settings and the choice of the next token from the last logits.

Sampling stays outside the decode step (and its CUDA graph): it draws from a torch.Generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DECODE_MODES", "SamplingConfig", "filter_logits", "sample_next"]

DECODE_MODES = ("auto", "dynamic", "eager", "cuda_graph", "compile")  # SamplingConfig.decode_mode; decoder.py runs them


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 = greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = off."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p; 1 = off."""
    min_length: int = 0
    """New tokens to generate before EOS is allowed (EOS logit set to -inf until then)."""
    repetition_penalty: float = 1.0
    """CTRL/HF-style: logits of tokens already in prompt or output: positive / p, negative * p."""
    seed: int | None = None
    eos_id: int | None = None
    """Stop a sequence at this token (None: always max_new_tokens)."""
    use_cache: bool = True
    """False: a full forward over the whole prefix per token (slow; for checks and benchmarks)."""
    decode_mode: str = "auto"
    """Cached decoding's per-token step: "dynamic" (``forward_step``, Python positions), or the
    static-shape step (``static_step``, neollm/inference/step.py) run "eager", as a "cuda_graph"
    or "compile"d (neollm/inference/decoder.py). "auto": "cuda_graph" on CUDA (falling back to "dynamic" with a
    warning if the capture fails), "dynamic" elsewhere. The prompt is always prefilled by
    ``forward_step``."""

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {self.min_length}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}; got {self.decode_mode!r}")
        if not self.use_cache and self.decode_mode not in ("auto", "dynamic"):
            raise ValueError(f"decode_mode {self.decode_mode!r} decodes with the cache; drop use_cache=False "
                             "(--no-cache) or use decode_mode 'auto'")


def filter_logits(logits: Tensor, cfg: SamplingConfig, seen: Tensor | None = None,
                  n_generated: int = 0) -> Tensor:
    """Apply repetition penalty, min_length EOS suppression, temperature, top-k, top-p to
    ``logits`` [B, vocab] (float32 copy returned; -inf marks removed tokens)."""
    logits = logits.float().clone()
    if cfg.repetition_penalty != 1.0 and seen is not None and seen.numel():
        score = logits.gather(1, seen)
        score = torch.where(score > 0, score / cfg.repetition_penalty, score * cfg.repetition_penalty)
        logits.scatter_(1, seen, score)
    if cfg.eos_id is not None and n_generated < cfg.min_length:
        logits[:, cfg.eos_id] = float("-inf")
    if cfg.temperature == 0:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= cfg.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def sample_next(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None,
                seen: Tensor | None = None, n_generated: int = 0) -> Tensor:
    """Next token ids [B] from last-position logits [B, vocab]."""
    filtered = filter_logits(logits, cfg, seen, n_generated)
    if cfg.temperature == 0:
        return filtered.argmax(dim=-1)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
