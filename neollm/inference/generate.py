"""Text generation: sample continuations of token-id prompts with cached decoding.

The prompt is prefilled by ``forward_step`` (neollm/inference/step.py); each new token then goes
through the per-token step ``SamplingConfig.decode_mode`` picks: "dynamic" (``forward_step``
again), or a ``StaticDecoder`` (neollm/inference/decoder.py) running the static step "eager", as a
"cuda_graph" or "compile"d ("auto": "cuda_graph" on CUDA, falling back to "dynamic" with a warning
if the capture fails; "dynamic" elsewhere). ``use_cache=False`` runs the full forward over the
whole prefix per token instead (for checks and benchmarks).

Batched prompts: prompts of different lengths are grouped by length and each group is decoded
as one batch (no padding, so positions and every mixer's state are exactly those of each prompt
alone); results come back in the input order. Sampling draws from one generator seeded with
``seed``, so a run is reproducible for the same prompts and settings.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import torch
from torch import Tensor

from neollm.inference.cache import new_cache
from neollm.inference.decoder import DecoderPool, StaticDecoder, resolve_decode_mode
from neollm.inference.sampling import SamplingConfig, sample_next
from neollm.inference.step import forward_step
from neollm.model.model import NeoLLM

__all__ = ["generate"]


def _static_decoder(model: NeoLLM, batch: int, max_len: int, mode: str, requested: str,
                    kernels: str, decoders):
    """The StaticDecoder for ``mode`` (from ``decoders``, a DecoderPool, when given), or None for
    the dynamic path: "auto" falls back to it (with a warning) when the graph capture fails."""
    try:
        if isinstance(decoders, DecoderPool):
            return decoders.get(model, batch, max_len, mode, kernels)
        return StaticDecoder(model, batch, max_len, mode, kernels)
    except Exception as exc:  # noqa: BLE001 (auto: any capture/compile failure falls back)
        if requested != "auto":
            raise
        warnings.warn(f"decode_mode 'auto': the {mode} decoder failed ({exc}); decoding with the dynamic "
                      "step instead (decode_mode='dynamic' skips the attempt)", RuntimeWarning, stacklevel=3)
        return None


@torch.no_grad()
def _generate_batch(model: NeoLLM, prompt: Tensor, cfg: SamplingConfig,
                    generator: torch.Generator | None, kernels: str, mode: str,
                    decoders=None) -> list[list[int]]:
    B, P = prompt.shape
    total = P + cfg.max_new_tokens
    context = model.rope.shape[0]
    if P == 0:
        raise ValueError("empty prompt: give at least one token (e.g. BOS or EOS)")
    if total > context:
        raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({cfg.max_new_tokens}) = {total} "
                         f"exceeds the model's context of {context} tokens")
    seq = prompt
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    decoder = None
    if cfg.use_cache and mode != "dynamic" and cfg.max_new_tokens > 1:  # else no decode step runs
        decoder = _static_decoder(model, B, total, mode, cfg.decode_mode, kernels, decoders)
    if decoder is not None:
        logits = decoder.prefill(prompt)
        advance = decoder.step
    elif cfg.use_cache:
        cache = new_cache(model, total, kernels)
        logits = forward_step(model, prompt, cache)[:, -1]
        advance = lambda nxt: forward_step(model, nxt[:, None], cache)[:, -1]  # noqa: E731
    else:
        logits = model(prompt)[:, -1]
        advance = lambda nxt: model(seq)[:, -1]  # noqa: E731  (seq already holds nxt)
    for step in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, generator, seq if cfg.repetition_penalty != 1.0 else None, step)
        if cfg.eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, cfg.eos_id), nxt)
            done = done | (nxt == cfg.eos_id)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        # (the all-done check is a host sync: only when EOS can stop a sequence)
        if step == cfg.max_new_tokens - 1 or (cfg.eos_id is not None and bool(done.all())):
            break
        logits = advance(nxt)
    out = []
    for row in seq[:, P:].tolist():
        if cfg.eos_id is not None and cfg.eos_id in row:
            row = row[: row.index(cfg.eos_id) + 1]
        out.append(row)
    return out


@torch.no_grad()
def generate(model: NeoLLM, prompts: Sequence[Sequence[int]], cfg: SamplingConfig | None = None,
             kernels: str = "auto", decoders=None, **overrides) -> list[list[int]]:
    """Sample continuations of token-id prompts; returns the new ids of each prompt (ending with
    EOS when one was sampled). ``overrides`` replace fields of ``cfg`` (e.g. ``top_k=50``).

    Prompts of different lengths are decoded in groups of equal length (no padding). With a
    static ``cfg.decode_mode`` each group gets a ``StaticDecoder`` for
    (group size, prompt length + max_new_tokens): its CUDA graph capture / compilation is paid
    in this call unless ``decoders`` (a ``DecoderPool``) holds one from an earlier
    call with the same sizes. ``kernels``: the mixers' recurrence kernels ("auto" | "fla" | "torch",
    see ``new_cache``)."""
    cfg = dataclasses.replace(cfg or SamplingConfig(), **overrides)
    cfg.validate()
    device = model.tok_embeddings.weight.device
    mode = resolve_decode_mode(cfg.decode_mode, device) if cfg.use_cache else "dynamic"
    was_training = model.training
    model.eval()
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    results: list[list[int]] = [[] for _ in prompts]
    try:
        for length in sorted(groups):
            idx = groups[length]
            batch = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=device)
            for i, row in zip(idx, _generate_batch(model, batch, cfg, generator, kernels, mode, decoders)):
                results[i] = row
    finally:
        model.train(was_training)
    return results
