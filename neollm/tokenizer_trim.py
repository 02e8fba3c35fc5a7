"""Trimming a byte-level BPE tokenizer to the N most frequent tokens on a corpus: the code behind
tools/trim_tokenizer.py (its docstring gives the rule: byte and added tokens always kept, BPE
tokens by corpus frequency with the tokens their merges need, ids renumbered densely).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class TrimError(RuntimeError):
    """A failure whose message says what to change; printed as one line."""


def _merge_pair(m) -> tuple[str, str]:
    """A merge as stored in tokenizer.json: ``["a", "b"]`` (tokenizers >= 0.20) or ``"a b"``."""
    if isinstance(m, str):
        a, b = m.split(" ", 1)
        return a, b
    return m[0], m[1]


def byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def check_byte_level_bpe(spec: dict, where: str) -> None:
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise TrimError(f"{where}: model type {model.get('type')!r}; only BPE tokenizers can be trimmed")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TrimError(f"{where}: BPE with subword prefixes/suffixes is not byte-level; not supported")
    if "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise TrimError(f"{where}: not a byte-level BPE (no ByteLevel pre-tokenizer); not supported")
    missing = [c for c in byte_alphabet() if c not in model["vocab"]]
    if missing:
        raise TrimError(f"{where}: {len(missing)} of the 256 byte tokens are missing from the vocabulary")


def select_tokens(vocab: dict[str, int], merges: list, counts: np.ndarray, budget: int) -> set[str]:
    """The kept BPE tokens: 256 bytes + most frequent tokens with their merge ancestors."""
    bytes_ = set(byte_alphabet())
    if budget < len(bytes_):
        raise TrimError(f"N leaves room for {budget} BPE tokens, fewer than the 256 byte tokens")
    recipe: dict[str, tuple[str, str]] = {}
    for m in merges:
        a, b = _merge_pair(m)
        recipe.setdefault(a + b, (a, b))
    kept = set(bytes_)
    order = sorted((t for t in vocab if t not in bytes_),
                   key=lambda t: (-int(counts[vocab[t]]) if vocab[t] < len(counts) else 0, vocab[t]))
    for token in order:
        if len(kept) >= budget:
            break
        if token in kept:
            continue
        need: set[str] = set()
        stack = [token]
        ok = True
        while stack:
            t = stack.pop()
            if t in kept or t in need:
                continue
            if t not in recipe:  # not a byte and no merge builds it: BPE can never produce it
                ok = False
                break
            need.add(t)
            stack.extend(recipe[t])
        if ok and len(kept) + len(need) <= budget:
            kept |= need
    return kept


def trim(spec: dict, config: dict | None, counts: np.ndarray, n: int) -> tuple[dict, dict | None, dict]:
    """(new tokenizer.json dict, new tokenizer_config dict, old id -> new id)."""
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    added = sorted(spec.get("added_tokens", []), key=lambda t: t["id"])
    added_in_vocab = [t for t in added if t["content"] in vocab]
    budget = n - (len(added) - len(added_in_vocab))
    kept = select_tokens(vocab, model["merges"], counts, budget)
    for t in added_in_vocab:  # an added token that is also a BPE entry keeps its entry
        kept.add(t["content"])
    new_vocab = {t: i for i, t in enumerate(sorted(kept, key=lambda t: vocab[t]))}
    remap = {vocab[t]: i for t, i in new_vocab.items()}
    next_id = len(new_vocab)
    new_added = []
    for t in added:
        t = dict(t)
        if t["content"] in new_vocab:
            new_id = new_vocab[t["content"]]
        else:
            new_id, next_id = next_id, next_id + 1
        remap[t["id"]] = new_id
        t["id"] = new_id
        new_added.append(t)
    new_merges = []
    for m in model["merges"]:
        a, b = _merge_pair(m)
        if a + b in new_vocab:
            assert a in new_vocab and b in new_vocab, (a, b)
            new_merges.append(m)
    out = dict(spec)
    out["model"] = {**model, "vocab": new_vocab, "merges": new_merges}
    out["added_tokens"] = new_added
    post = spec.get("post_processor")
    if isinstance(post, dict) and isinstance(post.get("special_tokens"), dict):
        post = json.loads(json.dumps(post))
        for entry in post["special_tokens"].values():
            entry["ids"] = [remap[i] for i in entry.get("ids", [])]
        out["post_processor"] = post
    new_config = None
    if config is not None:
        new_config = dict(config)
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            new_config["added_tokens_decoder"] = {
                str(remap[int(i)]): v for i, v in sorted(decoder.items(), key=lambda kv: int(kv[0]))
                if int(i) in remap}
    return out, new_config, remap


def count_tokens(tokenizer, texts_batches, size: int) -> tuple[np.ndarray, int, int]:
    """(count of every id, number of tokens, number of characters) over the corpus."""
    counts = np.zeros(size, dtype=np.int64)
    n_tokens = n_chars = 0
    for texts in texts_batches:
        for enc in tokenizer.encode_batch(texts):
            ids = np.asarray(enc.ids, dtype=np.int64)
            counts += np.bincount(ids, minlength=size)[:size]
            n_tokens += len(ids)
        n_chars += sum(map(len, texts))
    return counts, n_tokens, n_chars


@dataclass
class TrimSource:
    """A checked source tokenizer and the corpus it is trimmed on."""
    folder: Path
    spec: dict
    config: dict | None
    vocab_size: int
    texts: Any  # the corpus as neollm.data.sources.open_local_texts returns it


def open_source(folder: Path, corpus: str, vocab_size: int, text_column: str) -> TrimSource:
    """Check the tokenizer in ``folder`` (byte-level BPE) and the requested size, open the corpus.
    Raises TrimError, FileNotFoundError or ConfigError with a one-line message."""
    from neollm.data.sources import open_local_texts
    from neollm.tokenizer import tokenizer_vocab_size

    if not (folder / "tokenizer.json").is_file():
        raise TrimError(f"--tokenizer {folder}: no tokenizer.json there")
    spec = json.loads((folder / "tokenizer.json").read_text())
    check_byte_level_bpe(spec, str(folder / "tokenizer.json"))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    old_size = tokenizer_vocab_size(folder)
    n_added = len(spec.get("added_tokens", []))
    if not 256 + n_added <= vocab_size:
        raise TrimError(f"--vocab-size {vocab_size} is below the 256 byte tokens + {n_added} "
                        "added tokens that are always kept")
    return TrimSource(folder, spec, config, old_size, open_local_texts(corpus, text_column))


def write_trimmed(source: TrimSource, corpus: str, vocab_size: int, out: Path,
                  max_docs: int | None) -> tuple[dict, float, float]:
    """Count the tokens of ``source``'s corpus, write the trimmed tokenizer and trim_report.json
    into ``out``. Returns (the report, the fraction of corpus tokens kept, seconds taken)."""
    from tokenizers import Tokenizer

    from neollm.data.sources import text_batches
    from neollm.tokenizer import NeoLLMTokenizer, tokenizer_vocab_size

    src, ds, old_size = source.folder, source.texts, source.vocab_size
    n_docs = len(ds) if max_docs is None else min(len(ds), max_docs)

    t0 = time.perf_counter()
    original = Tokenizer.from_file(str(src / "tokenizer.json"))
    original.encode_special_tokens = True  # "<|endoftext|>" inside a document is text (as NeoLLM encodes)
    counts, n_tokens, n_chars = count_tokens(original, text_batches(ds, n_docs), old_size)
    new_spec, new_config, remap = trim(source.spec, source.config, counts, vocab_size)

    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(new_spec, ensure_ascii=False))
    if new_config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(new_config, indent=2, ensure_ascii=False) + "\n")
    for extra in ("special_tokens_map.json", "generation_config.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, out / extra)

    trimmed = Tokenizer.from_file(str(out / "tokenizer.json"))
    trimmed.encode_special_tokens = True
    _, new_tokens, _ = count_tokens(trimmed, text_batches(ds, n_docs), tokenizer_vocab_size(out))
    kept_old = np.fromiter((o for o in remap if o < len(counts)), dtype=np.int64)
    coverage = float(counts[kept_old].sum() / max(n_tokens, 1))
    NeoLLMTokenizer(str(out))  # loads as the trainer will
    report = {
        "source": str(src), "source_sha256": hashlib.sha256((src / "tokenizer.json").read_bytes()).hexdigest(),
        "corpus": corpus, "documents": n_docs, "characters": n_chars,
        "vocab_size": tokenizer_vocab_size(out), "requested": vocab_size, "source_vocab_size": old_size,
        "distinct_tokens_in_corpus": int((counts > 0).sum()),
        "corpus_tokens_kept_fraction": round(coverage, 6),
        "tokens_per_char_before": round(n_tokens / max(n_chars, 1), 5),
        "tokens_per_char_after": round(new_tokens / max(n_chars, 1), 5),
        "merges": len(new_spec["model"]["merges"]), "added_tokens": len(new_spec["added_tokens"]),
    }
    (out / "trim_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report, coverage, time.perf_counter() - t0
