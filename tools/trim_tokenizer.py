#!/usr/bin/env python
"""Reduce a byte-level BPE tokenizer to the N most frequent tokens on a corpus.

The seed 001 model uses a 64,402-token vocabulary derived from Qwen3's 151,669. This tool makes
such a vocabulary from any byte-level BPE ``tokenizer.json`` (Qwen2/3, GPT-2 style):

1. encode the corpus with the original tokenizer and count every token;
2. keep all 256 byte tokens (so any text still encodes: nothing is ever unknown) and every
   added/special token (``<|endoftext|>``, ...);
3. add BPE tokens in order of corpus frequency (ties and unseen tokens: original id order, i.e.
   merge order), each together with the tokens its merge is built from, recursively, while the
   total stays <= N; a token is only kept if BPE can still build it;
4. keep exactly the merges whose result is kept, in their original order, and renumber the ids
   densely: kept BPE tokens in original id order from 0, then the added tokens.

``N`` (``--vocab-size``) is the total number of ids of the result, added tokens included, so a
model with ``[model] vocab_size = N`` covers it. Writes ``tokenizer.json`` and
``tokenizer_config.json`` (its ``added_tokens_decoder`` renumbered) plus ``trim_report.json``
(source hash, corpus coverage, tokens per character before and after).

    python tools/trim_tokenizer.py --tokenizer assets/tokenizer/qwen3 \\
        --input data/wiki_vital_en/train.jsonl --vocab-size 64402 --out assets/tokenizer/qwen3_64k

On a corpus the size of wiki_vital_en only ~30k Qwen3 tokens occur; the rest of N is filled in
merge order. For a FineWeb-Edu-like vocabulary count on a sample of it (--input parquet files).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np



class TrimError(RuntimeError):
    pass


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default="assets/tokenizer/qwen3", help="folder with tokenizer.json")
    ap.add_argument("--input", required=True, help="corpus: file, folder or glob of .jsonl/.json/.parquet/.txt")
    ap.add_argument("--vocab-size", type=int, required=True, help="N: total ids of the result, added tokens included")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--max-docs", type=int, default=None, help="count tokens on the first N documents only")
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer

    from neollm.data.sources import open_local_texts, text_batches
    from neollm.errors import ConfigError
    from neollm.tokenizer import NeoLLMTokenizer, tokenizer_vocab_size

    src = Path(args.tokenizer)
    try:
        if not (src / "tokenizer.json").is_file():
            raise TrimError(f"--tokenizer {src}: no tokenizer.json there")
        spec = json.loads((src / "tokenizer.json").read_text())
        check_byte_level_bpe(spec, str(src / "tokenizer.json"))
        config_path = src / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else None
        old_size = tokenizer_vocab_size(src)
        n_added = len(spec.get("added_tokens", []))
        if not 256 + n_added <= args.vocab_size:
            raise TrimError(f"--vocab-size {args.vocab_size} is below the 256 byte tokens + {n_added} "
                            "added tokens that are always kept")
        ds = open_local_texts(args.input, args.text_column)
    except (TrimError, FileNotFoundError, ConfigError) as e:
        print(f"trim_tokenizer: error: {e}", file=sys.stderr)
        return 1
    n_docs = len(ds) if args.max_docs is None else min(len(ds), args.max_docs)

    t0 = time.perf_counter()
    original = Tokenizer.from_file(str(src / "tokenizer.json"))
    original.encode_special_tokens = True  # "<|endoftext|>" inside a document is text (as NeoLLM encodes)
    counts, n_tokens, n_chars = count_tokens(original, text_batches(ds, n_docs), old_size)
    new_spec, new_config, remap = trim(spec, config, counts, args.vocab_size)

    out = Path(args.out)
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
        "corpus": args.input, "documents": n_docs, "characters": n_chars,
        "vocab_size": tokenizer_vocab_size(out), "requested": args.vocab_size, "source_vocab_size": old_size,
        "distinct_tokens_in_corpus": int((counts > 0).sum()),
        "corpus_tokens_kept_fraction": round(coverage, 6),
        "tokens_per_char_before": round(n_tokens / max(n_chars, 1), 5),
        "tokens_per_char_after": round(new_tokens / max(n_chars, 1), 5),
        "merges": len(new_spec["model"]["merges"]), "added_tokens": len(new_spec["added_tokens"]),
    }
    (out / "trim_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[trim_tokenizer] {out}: {report['vocab_size']:,} ids (from {old_size:,}); "
          f"{report['distinct_tokens_in_corpus']:,} distinct tokens on {n_docs:,} documents, "
          f"{coverage:.2%} of their tokens kept; tokens/char {report['tokens_per_char_before']} -> "
          f"{report['tokens_per_char_after']} ({time.perf_counter() - t0:.1f}s). Use [model] "
          f"hf_assets_path = \"{out}\" and vocab_size >= {report['vocab_size']}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
