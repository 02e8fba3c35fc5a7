#!/usr/bin/env python
"""Tokenize text into binary token shards for ``[training] dataset = "shards"``.

Input: local files (``--input``: a file, folder or glob of .jsonl/.json/.parquet/.txt, as
``local_text`` resolves them) or a Hugging Face hub dataset streamed when online
(``--hub HuggingFaceFW/fineweb-edu:sample-10BT``). Output (``--out``): the format in
neollm/data/shards.py, written by neollm/data/shard_writer.py: ``index.json`` + ``train/*.bin|.idx`` (+ ``validation/*``). Each document
is ``tokenizer.encode(text, add_bos=True, add_eos=True)`` exactly as the on-the-fly path packs
it (Qwen3: its tokens + ``<|endoftext|>``), stored as uint16 when the vocabulary fits, else
uint32; ``--max-doc-tokens`` truncation is NOT applied here (shards keep whole documents;
``[data] max_doc_tokens_factor`` truncates when reading).

* multiprocess: ``--workers`` processes (multiprocessing Pool) tokenize batches of documents;
* resumable: the input is cut into chunks of ``--docs-per-shard`` documents; each chunk's files
  are written atomically (temp file + rename) and then recorded in ``<out>/progress/``; a rerun
  with the same settings skips finished chunks and continues (a changed setting is an error
  unless ``--force``, which starts over);
* split: ``--validation-fraction F`` puts a document in ``validation`` when a hash of its text
  falls below F (deterministic, order-independent); ``--validation-input`` tokenizes other
  files as the validation split.

Usage (from the repository root)::

    python tools/tokenize_data.py        # default corpus -> data/shards/wiki_vital_en
    python tools/tokenize_data.py --input 'corpus/*.jsonl' --validation-fraction 0.005 --out data/shards/corpus
    python tools/tokenize_data.py --hub HuggingFaceFW/fineweb-edu:sample-10BT --max-docs 2000000 \\
        --validation-fraction 0.001 --out data/shards/fineweb_edu     # online only

Then train with ``--training.dataset shards --training.dataset_path <out>`` (and, for validation,
``--validation.enable --validation.dataset shards_validation``).
"""

from __future__ import annotations

import argparse
import os
import sys

from neollm.data.shard_writer import TokenizeError, run, summary
from neollm.errors import ConfigError

DEFAULT_TOKENIZER = "assets/tokenizer/qwen3"
DEFAULT_INPUT = "data/wiki_vital_en/train.jsonl"
DEFAULT_VALIDATION_INPUT = "data/wiki_vital_en/validation.jsonl"
DEFAULT_OUT = "data/shards/wiki_vital_en"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--input", help="local text: file, folder or glob of .jsonl/.json/.parquet/.txt "
                     f"(default, with --validation-input: {DEFAULT_INPUT})")
    src.add_argument("--hub", help="hub dataset REPO[:CONFIG], streamed (needs network), e.g. "
                     "HuggingFaceFW/fineweb-edu:sample-10BT")
    ap.add_argument("--hub-split", default="train", help="split of the hub dataset (default train)")
    ap.add_argument("--validation-input", help="local text tokenized as the validation split")
    ap.add_argument("--validation-fraction", type=float, default=0.0,
                    help="put this fraction of --input/--hub documents (by text hash) in validation")
    ap.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT} for the default "
                    "corpus)")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                    help=f"tokenizer folder with tokenizer.json (default {DEFAULT_TOKENIZER}); "
                    "must be the run's [model] hf_assets_path")
    ap.add_argument("--text-column", default="text", help="column holding the document text")
    ap.add_argument("--max-docs", type=int, default=None, help="stop after this many input documents")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    ap.add_argument("--docs-per-shard", type=int, default=50_000,
                    help="documents per shard file (the unit of resumption)")
    ap.add_argument("--batch-docs", type=int, default=256, help="documents per worker task")
    ap.add_argument("--force", action="store_true", help="delete earlier output in --out and start over")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if not args.input and not args.hub:
        args.input = DEFAULT_INPUT
        if args.validation_input is None and args.validation_fraction == 0:
            args.validation_input = DEFAULT_VALIDATION_INPUT
        args.out = args.out or DEFAULT_OUT
    if not args.out:
        ap.error("--out is required with --input/--hub")
    if not 0 <= args.validation_fraction < 1:
        ap.error("--validation-fraction must be in [0, 1)")
    if args.docs_per_shard <= 0 or args.batch_docs <= 0:
        ap.error("--docs-per-shard and --batch-docs must be positive")
    try:
        index = run(args)
    except (TokenizeError, FileNotFoundError, ConfigError) as e:  # ConfigError: the shared source helpers
        print(f"tokenize_data: error: {e}", file=sys.stderr)
        return 1
    print(summary(index, args.out, args.workers))
    return 0

if __name__ == "__main__":
    sys.exit(main())
