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
import sys
from pathlib import Path


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
    from neollm.tokenizer_train import train_and_save

    try:
        ds = open_local_texts(args.input, args.text_column)
    except (FileNotFoundError, ConfigError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 1
    n = len(ds) if args.max_docs is None else min(len(ds), args.max_docs)
    print(train_and_save(text_batches(ds, n), n, Path(args.out), args.vocab_size, args.min_frequency,
                         not args.quiet, args.max_length))
    return 0


if __name__ == "__main__":
    sys.exit(main())
