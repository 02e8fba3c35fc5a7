"""How a document becomes tokens, shared by the on-the-fly and the pre-tokenized paths.

A document is ``tokenizer.encode(text, add_bos=True, add_eos=True)``, exactly as torchtitan's
HuggingFaceTextDataset encodes it: for NeoLLMTokenizer (Qwen3) that is the text's tokens followed
by ``<|endoftext|>``, no BOS. Documents are concatenated and cut into windows of ``seq_len + 1``
tokens (input = window[:-1], labels = window[1:]); windows do not overlap and a document may
straddle two windows.

``[data] max_doc_tokens_factor = k`` truncates each document to ``k * seq_len`` tokens, its
end-of-document token included (the document's first ``k * seq_len - 1`` tokens + EOS), so a
very long page cannot fill many consecutive windows. The same function truncates on the fly and
when reading shards (which always store whole documents), so both paths give the same stream.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from neollm.errors import ConfigError


def contiguous_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part ``index`` when ``n`` items are cut into ``parts`` contiguous parts.

    The same split as ``datasets.Dataset.shard(parts, index, contiguous=True)``, which
    ``split_dataset_by_node`` uses for map-style datasets: the first ``n % parts`` parts get one
    item more. Parts are disjoint and together cover ``range(n)``.
    """
    if parts <= 0 or not 0 <= index < parts:
        raise ValueError(f"part {index} of {parts} does not exist")
    div, mod = divmod(n, parts)
    start = div * index + min(index, mod)
    return start, start + div + (1 if index < mod else 0)


def max_doc_tokens_factor(job_config: Any) -> int:
    """``[data] max_doc_tokens_factor`` (0 when the section is absent), validated."""
    factor = getattr(getattr(job_config, "data", None), "max_doc_tokens_factor", 0) or 0
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 0:
        raise ConfigError(
            f"[data] max_doc_tokens_factor must be a whole number >= 0 (0 = keep documents "
            f"whole; seed 000 uses 4), got {factor!r}")
    return factor


def max_doc_tokens(job_config: Any, seq_len: int) -> int:
    """The per-document token limit for windows of ``seq_len`` (0 = no limit)."""
    return max_doc_tokens_factor(job_config) * seq_len


def truncate_document(ids, max_tokens: int, eos_id: int | None):
    """``ids`` cut to ``max_tokens`` tokens, keeping its final EOS (list or numpy array)."""
    if not max_tokens or len(ids) <= max_tokens:
        return ids
    if eos_id is not None and int(ids[-1]) == eos_id:
        if isinstance(ids, np.ndarray):
            return np.concatenate([ids[: max_tokens - 1], ids[-1:]])
        return list(ids[: max_tokens - 1]) + [ids[-1]]
    return ids[:max_tokens]


def encode_documents(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """``[tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts]``, batched.

    For torchtitan's HuggingFaceTokenizer (NeoLLMTokenizer) the batch goes through the Rust
    ``encode_batch_fast`` (``encode_batch`` without character offsets, which nothing here reads:
    the same ids, ~1.3x faster; ``encode_batch`` on tokenizers before 0.21) and BOS/EOS are added
    by the same rule as its ``encode``; any other tokenizer is called one text at a time.
    """
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    if not isinstance(tokenizer, HuggingFaceTokenizer):
        return [tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts]
    bos = tokenizer.bos_id if not tokenizer.hf_adds_bos else None
    eos = tokenizer.eos_id if not tokenizer.hf_adds_eos else None
    out = []
    rust = tokenizer.tokenizer
    for enc in getattr(rust, "encode_batch_fast", rust.encode_batch)(list(texts)):
        ids = enc.ids
        if bos is not None:
            ids.insert(0, bos)
        if eos is not None:
            ids.append(eos)
        out.append(ids)
    return out
