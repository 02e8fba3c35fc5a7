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
import sys
from pathlib import Path

from neollm.errors import ConfigError
from neollm.tokenizer_trim import TrimError, open_source, write_trimmed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default="assets/tokenizer/qwen3", help="folder with tokenizer.json")
    ap.add_argument("--input", required=True, help="corpus: file, folder or glob of .jsonl/.json/.parquet/.txt")
    ap.add_argument("--vocab-size", type=int, required=True, help="N: total ids of the result, added tokens included")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--max-docs", type=int, default=None, help="count tokens on the first N documents only")
    args = ap.parse_args(argv)

    try:
        source = open_source(Path(args.tokenizer), args.input, args.vocab_size, args.text_column)
    except (TrimError, FileNotFoundError, ConfigError) as e:
        print(f"trim_tokenizer: error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    report, coverage, seconds = write_trimmed(source, args.input, args.vocab_size, out, args.max_docs)
    print(f"[trim_tokenizer] {out}: {report['vocab_size']:,} ids (from {source.vocab_size:,}); "
          f"{report['distinct_tokens_in_corpus']:,} distinct tokens on {report['documents']:,} documents, "
          f"{coverage:.2%} of their tokens kept; tokens/char {report['tokens_per_char_before']} -> "
          f"{report['tokens_per_char_after']} ({seconds:.1f}s). Use [model] "
          f"hf_assets_path = \"{out}\" and vocab_size >= {report['vocab_size']}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
