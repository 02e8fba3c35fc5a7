"""The token-shard writer behind tools/tokenize_data.py (the reader is neollm/data/shards.py).

Each document is ``tokenizer.encode(text, add_bos=True, add_eos=True)`` exactly as the on-the-fly
path packs it, stored as uint16 when the vocabulary fits, else uint32, whole documents. Worker
processes tokenize batches of documents; the input is cut into chunks of ``docs_per_shard``
documents whose files are written atomically and then recorded in ``<out>/progress/``, so a rerun
with the same settings skips finished chunks (a changed setting is an error unless ``force``).
``validation_fraction`` puts a document in ``validation`` by the hold-out rule of
neollm/data/holdout.py (a hash of its text: deterministic, order-independent), so shards and the
streamed ``fineweb_edu`` / ``fineweb_edu_validation`` split hold out the same documents.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import deque
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from neollm.data.holdout import is_held_out
from neollm.data.shards import (
    DOC_INDEX_DTYPE, FORMAT, FORMAT_VERSION, INDEX_NAME, token_dtype, tokenizer_sha256, write_atomic,
)

PROGRESS = "progress"
SETTINGS = "settings.json"


class TokenizeError(RuntimeError):
    """A failure whose message says what to change; printed as one line."""


# ----------------------------------------------------------------------------- inputs


class Source:
    """Documents of one input, in a fixed order, readable from any chunk on."""

    def __init__(self, name: str, spec: str, hub: bool, text_column: str, max_docs: int | None,
                 hub_split: str = "train"):
        self.name, self.spec, self.hub, self.text_column = name, spec, hub, text_column
        self.max_docs = max_docs
        self.hub_split = hub_split
        self._ds = None

    def describe(self) -> dict[str, Any]:
        """What identifies this input in the settings a rerun must match."""
        d = {"name": self.name, "hub" if self.hub else "input": self.spec,
             "text_column": self.text_column, "max_docs": self.max_docs}
        if not self.hub:  # the files themselves: a rerun on changed files must not mix them
            from neollm.data.sources import _resolve_local_files

            files = _resolve_local_files(self.spec)
            d["files"] = len(files)
            d["bytes"] = sum(os.path.getsize(f) for f in files)
        return d

    def open(self):
        if self._ds is None:
            self._ds = open_hub(self.spec, self.hub_split) if self.hub else open_local(self.spec, self.text_column)
        return self._ds

    def size(self) -> int | None:
        """Number of documents, None when unknown (streaming without --max-docs)."""
        if self.hub:
            return self.max_docs
        n = len(self.open())
        return min(n, self.max_docs) if self.max_docs is not None else n

    def chunks(self, docs_per_chunk: int, done: set[int]) -> Iterator[tuple[int, list[str] | None]]:
        """(chunk number, its texts) for every chunk; texts None for a finished chunk when
        skipping it costs nothing (local files)."""
        ds = self.open()
        col = self.text_column
        if not self.hub:
            n = self.size()
            for k, start in enumerate(range(0, n, docs_per_chunk)):
                if k in done:
                    yield k, None
                    continue
                yield k, [str(t) for t in ds[start:min(start + docs_per_chunk, n)][col]]
            return
        texts: list[str] = []
        k = 0
        for i, row in enumerate(ds):
            if self.max_docs is not None and i >= self.max_docs:
                break
            if col not in row:
                raise TokenizeError(f"--hub {self.spec}: rows have no {col!r} column "
                                    f"(columns: {sorted(row)}): set --text-column")
            texts.append(str(row[col]))
            if len(texts) == docs_per_chunk:
                yield k, (None if k in done else texts)
                texts, k = [], k + 1
        if texts:
            yield k, (None if k in done else texts)


def open_local(spec: str, text_column: str):
    from neollm.data.sources import open_local_texts

    return open_local_texts(spec, text_column, "--input")


def open_hub(spec: str, split: str):
    from datasets import load_dataset

    from neollm.data.sources import _hub_offline_reason

    repo, _, config = spec.partition(":")
    reason = _hub_offline_reason()
    if reason is not None:
        raise TokenizeError(
            f"--hub {spec}: the Hugging Face hub is unreachable ({reason}). Tokenize local files "
            "instead with --input <files> (jsonl/json/parquet/txt with a text column), e.g. the "
            "default corpus from `python tools/prepare_corpus.py`, or download the dataset's "
            "parquet files on a connected machine and pass them with --input.")
    return load_dataset(repo, name=config or None, split=split, streaming=True)


# ----------------------------------------------------------------------------- workers

_TOKENIZER = None
_TOKENIZER_KEY = None


def load_tokenizer(tokenizer_dir: str):
    """NeoLLMTokenizer of ``tokenizer_dir``, loaded once per process (and per file version)."""
    global _TOKENIZER, _TOKENIZER_KEY
    from neollm.tokenizer import NeoLLMTokenizer

    f = Path(tokenizer_dir) / "tokenizer.json"
    key = (str(Path(tokenizer_dir).resolve()), f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None
    if _TOKENIZER is None or key is None or key != _TOKENIZER_KEY:
        _TOKENIZER, _TOKENIZER_KEY = NeoLLMTokenizer(tokenizer_dir), key
    return _TOKENIZER


def _init_worker(tokenizer_dir: str, threads: int = 0) -> None:
    """``threads``: the tokenizers library's own thread pool size in this process (0 = its
    default, all cores). 2 threads per worker were measured faster than 1 on 2 cores (a worker's
    Python part leaves its core idle otherwise; BENCHMARKS.md, tokenize_data.py throughput)."""
    if threads:
        os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
    load_tokenizer(tokenizer_dir)


def _tokenize(task: tuple[int, list[str], float, str]) -> tuple[int, dict[str, tuple]]:
    """A batch of texts of chunk ``k`` -> (k, per split (tokens, document lengths, max id))."""
    from neollm.data.packing import encode_documents

    chunk, texts, fraction, dtype = task
    docs = encode_documents(_TOKENIZER, texts)
    parts: dict[str, list[list[int]]] = {"train": [], "validation": []}
    for text, ids in zip(texts, docs):
        parts["validation" if is_held_out(text, fraction) else "train"].append(ids)
    out = {}
    for split, seqs in parts.items():
        if not seqs:
            continue
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        flat = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
        out[split] = (flat.astype(dtype), lengths, int(flat.max(initial=0)))
    return chunk, out


# ----------------------------------------------------------------------------- output


def chunk_marker(out: Path, source: str, k: int) -> Path:
    return out / PROGRESS / f"{source}-{k:05d}.json"


def write_chunk(out: Path, source: str, k: int, parts: dict[str, list[tuple]], route: str | None) -> dict:
    """Write one chunk's shard files (atomically), then its progress marker."""
    record: dict[str, Any] = {"source": source, "chunk": k, "splits": {}}
    for split, pieces in parts.items():
        split_name = route or split
        if not pieces:
            continue
        tokens = np.concatenate([p[0] for p in pieces])
        lengths = np.concatenate([p[1] for p in pieces])
        stem = f"{split_name}/{source}-{k:05d}"
        write_atomic(out / f"{stem}.bin", tokens.tobytes())
        write_atomic(out / f"{stem}.idx", np.cumsum(lengths).astype(DOC_INDEX_DTYPE).tobytes())
        entry = record["splits"].setdefault(split_name, [])
        entry.append({"file": f"{stem}.bin", "index": f"{stem}.idx", "documents": int(len(lengths)),
                      "tokens": int(len(tokens)), "max_token_id": max(p[2] for p in pieces)})
    write_atomic(chunk_marker(out, source, k), json.dumps(record).encode())
    return record


def settings_of(args, tokenizer: dict, sources: list[Source]) -> dict[str, Any]:
    return {"tokenizer_sha256": tokenizer["sha256"], "sources": [s.describe() for s in sources],
            "validation_fraction": args.validation_fraction, "docs_per_shard": args.docs_per_shard,
            "dtype": tokenizer["dtype"]}


def prepare_out(out: Path, settings: dict, force: bool) -> None:
    path = out / PROGRESS / SETTINGS
    if force and out.exists():
        for sub in ("train", "validation", PROGRESS):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / INDEX_NAME).unlink(missing_ok=True)
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            raise TokenizeError(
                f"--out {out} holds shards made with other settings ({', '.join(changed)} "
                "differ): rerun with --force to start over, or choose another --out")
        return
    if (out / INDEX_NAME).exists() or any((out / s).exists() for s in ("train", "validation")):
        raise TokenizeError(f"--out {out} already has shards of an unknown run: use --force "
                            "or another --out")
    write_atomic(path, json.dumps(settings, indent=2).encode())


def write_index(out: Path, records: list[dict], tokenizer: dict, settings: dict, seconds: float) -> dict:
    splits: dict[str, Any] = {}
    max_id = 0
    for rec in records:
        for split, shards in rec["splits"].items():
            s = splits.setdefault(split, {"documents": 0, "tokens": 0, "shards": []})
            for shard in shards:
                s["shards"].append({k: shard[k] for k in ("file", "index", "documents", "tokens")})
                s["documents"] += shard["documents"]
                s["tokens"] += shard["tokens"]
                max_id = max(max_id, shard["max_token_id"])
    for split in splits.values():
        split["shards"].sort(key=lambda s: s["file"])
    index = {
        "format": FORMAT, "version": FORMAT_VERSION, "created_by": "tools/tokenize_data.py",
        "tokenizer": {k: tokenizer[k] for k in ("path", "sha256", "vocab_size", "eos_id", "bos_id", "eos_token")},
        "dtype": tokenizer["dtype"], "max_token_id": max_id,
        "document_layout": "tokenizer.encode(text, add_bos=True, add_eos=True), whole documents",
        "settings": settings, "splits": splits,
        "seconds": round(seconds, 2),
    }
    write_atomic(out / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    return index


# ----------------------------------------------------------------------------- driver


def tokenizer_info(tokenizer_dir: str) -> dict[str, Any]:
    from neollm.tokenizer import tokenizer_vocab_size

    try:
        tok = load_tokenizer(tokenizer_dir)
        vocab = tokenizer_vocab_size(tokenizer_dir, tok.tokenizer)
    except FileNotFoundError as e:
        raise TokenizeError(f"--tokenizer: {e}") from e
    return {"path": tokenizer_dir, "sha256": tokenizer_sha256(tokenizer_dir), "vocab_size": vocab,
            "eos_id": tok.eos_id, "bos_id": tok.bos_id, "eos_token": tok.eos_token,
            "dtype": token_dtype(vocab).name}


def run(args) -> dict:
    """Tokenize the input(s) ``args`` names into shards under ``args.out`` and write the index.

    ``args``: tools/tokenize_data.py's parsed arguments (``out``, ``tokenizer``, ``input`` or
    ``hub`` with ``hub_split``, ``validation_input``, ``validation_fraction``, ``text_column``,
    ``max_docs``, ``workers``, ``docs_per_shard``, ``batch_docs``, ``force``, ``quiet``).
    Returns the index (plus ``new_tokens``, the tokens tokenized by this run)."""
    out = Path(args.out)
    tokenizer = tokenizer_info(args.tokenizer)
    sources: list[Source] = []
    if args.hub:
        sources.append(Source("in", args.hub, True, args.text_column, args.max_docs, args.hub_split))
    else:
        sources.append(Source("in", args.input, False, args.text_column, args.max_docs))
    if args.validation_input:
        sources.append(Source("val", args.validation_input, False, args.text_column, None))
    for source in sources:
        source.open()  # fails fast (missing files, no network) before anything is written
    settings = settings_of(args, tokenizer, sources)
    prepare_out(out, settings, args.force)

    from tqdm import tqdm

    t0 = time.perf_counter()
    workers = max(1, args.workers)
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(
            workers, initializer=_init_worker,
            initargs=(args.tokenizer, max(2, -(-2 * (os.cpu_count() or 1) // workers))))
    else:
        _init_worker(args.tokenizer)

    records: list[dict] = []
    new_tokens = 0
    try:
        for source in sources:
            route = "validation" if source.name == "val" else None
            fraction = 0.0 if route else args.validation_fraction
            done = {int(m.stem.rsplit("-", 1)[1]) for m in (out / PROGRESS).glob(f"{source.name}-*.json")}
            total = source.size()
            bar = tqdm(total=total, unit="doc", desc=f"tokenize {source.spec}", dynamic_ncols=True,
                       disable=args.quiet)
            pending: deque = deque()  # (chunk, batch count, AsyncResult | result)
            chunk_parts: dict[int, dict[str, list]] = {}
            chunk_left: dict[int, int] = {}

            def collect(block: bool) -> None:
                nonlocal new_tokens
                while pending and (block or _ready(pending[0])):
                    _, n_docs, res = pending.popleft()
                    k, parts = res.get() if hasattr(res, "get") else res
                    for split, piece in parts.items():
                        chunk_parts[k][split].append(piece)
                        new_tokens += len(piece[0])
                    bar.update(n_docs)
                    bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):,.0f}",
                                    refresh=False)
                    chunk_left[k] -= 1
                    if chunk_left[k] == 0:
                        records.append(write_chunk(out, source.name, k, chunk_parts.pop(k), route))
                        del chunk_left[k]

            for k, texts in source.chunks(args.docs_per_shard, done):
                if texts is None:
                    records.append(json.loads(chunk_marker(out, source.name, k).read_text()))
                    if total is not None:
                        bar.update(min(args.docs_per_shard, total - bar.n))
                    continue
                batches = [texts[i:i + args.batch_docs] for i in range(0, len(texts), args.batch_docs)]
                chunk_parts[k] = {"train": [], "validation": []}
                chunk_left[k] = len(batches)
                for b in batches:
                    task = (k, b, fraction, tokenizer["dtype"])
                    res = pool.apply_async(_tokenize, (task,)) if pool else _tokenize(task)
                    pending.append((k, len(b), res))
                    collect(block=len(pending) > 4 * workers)
            collect(block=True)
            bar.close()
            if not any(r["source"] == source.name for r in records):
                raise TokenizeError(f"{source.spec}: no documents to tokenize")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    seconds = time.perf_counter() - t0
    index = write_index(out, records, tokenizer, settings, seconds)
    index["new_tokens"] = new_tokens
    return index


def summary(index: dict, out: str, workers: int) -> str:
    """What ``run`` wrote, as tools/tokenize_data.py prints it: a line per split, then the index's."""
    secs = index["seconds"]
    lines = [f"[tokenize] {split}: {info['documents']:,} documents, {info['tokens']:,} tokens, "
             f"{len(info['shards'])} shard(s)" for split, info in index["splits"].items()]
    lines.append(f"[tokenize] {out}/{INDEX_NAME}: dtype {index['dtype']}, max id {index['max_token_id']}, "
                 f"tokenizer sha256 {index['tokenizer']['sha256'][:12]}...; {index['new_tokens']:,} tokens "
                 f"tokenized in {secs:.1f}s ({index['new_tokens'] / max(secs, 1e-9):,.0f} tokens/s, "
                 f"{workers} worker(s))")
    return "\n".join(lines)


def _ready(item) -> bool:
    res = item[2]
    return res.ready() if hasattr(res, "ready") else True
