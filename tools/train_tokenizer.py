#!/usr/bin/env python
"""Train a byte-level BPE tokenizer on a corpus with the ``tokenizers`` trainer.

Writes ``<out>/tokenizer.json`` + ``tokenizer_config.json``, a folder ``[model] hf_assets_path``
can name (torchtitan's HuggingFaceTokenizer / NeoLLMTokenizer load it). The tokenizer is
Qwen/GPT-style: NFC normalisation, the Qwen2/3 pre-tokenisation regex, byte-level BPE over the
256 byte symbols (so every text encodes, nothing is ever unknown), and ``<|endoftext|>`` as the
only special token, id 0, the document separator NeoLLM packs between documents (no BOS).

    python tools/train_tokenizer.py --input data/wiki_vital_en/train.jsonl --vocab-size 8192 \\
        --out assets/tokenizer/wiki_bpe8k
    ./run_train.sh --model.hf_assets_path assets/tokenizer/wiki_bpe8k --model.vocab_size 8192 ...

``--vocab-size`` counts everything (256 bytes + merges + the special token); the trainer may
stop short of it on a small corpus (it reports the size reached). Pre-tokenized shards must be
made again with the new tokenizer (tools/tokenize_data.py --tokenizer <out>).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


DOCUMENT_SEPARATOR = "<|endoftext|>"
# Qwen2/Qwen3's pre-tokenisation pattern (digits one by one, contractions, words, punctuation).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_config(max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": DOCUMENT_SEPARATOR,
        "pad_token": DOCUMENT_SEPARATOR,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {"0": {"content": DOCUMENT_SEPARATOR, "lstrip": False, "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}},
    }


def train(texts, vocab_size: int, min_frequency: int = 2, show_progress: bool = True, length=None):
    """A trained byte-level BPE ``tokenizers.Tokenizer`` over the iterable ``texts``."""
    from tokenizers import pre_tokenizers, trainers

    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[DOCUMENT_SEPARATOR], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="file, folder or glob of .jsonl/.json/.parquet/.txt")
    ap.add_argument("--out", required=True, help="output folder (tokenizer.json, tokenizer_config.json)")
    ap.add_argument("--vocab-size", type=int, required=True, help="total ids, bytes and <|endoftext|> included")
    ap.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge it")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    ap.add_argument("--max-length", type=int, default=131072, help="model_max_length in tokenizer_config.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.vocab_size < 258:
        ap.error("--vocab-size must be at least 258 (256 bytes, <|endoftext|> and one merge)")

    from neollm.data.sources import open_local_texts, text_batches
    from neollm.errors import ConfigError

    try:
        ds = open_local_texts(args.input, args.text_column)
    except (FileNotFoundError, ConfigError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 1
    n = len(ds) if args.max_docs is None else min(len(ds), args.max_docs)

    t0 = time.perf_counter()
    tok = train(text_batches(ds, n), args.vocab_size, args.min_frequency, not args.quiet, length=n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(args.max_length), indent=2) + "\n")

    from neollm.tokenizer import NeoLLMTokenizer, tokenizer_vocab_size

    loaded = NeoLLMTokenizer(str(out))  # what the trainer will load
    size = tokenizer_vocab_size(out)
    padded = -(-size // 64) * 64
    print(f"[train_tokenizer] {out}: {size:,} ids ({tok.get_vocab_size():,} requested {args.vocab_size:,}) "
          f"trained on {n:,} documents in {time.perf_counter() - t0:.1f}s; end-of-document "
          f"{loaded.eos_token!r} = {loaded.eos_id}. Use [model] hf_assets_path = \"{out}\" and "
          f"vocab_size >= {size} (e.g. {padded}, a multiple of 64).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
