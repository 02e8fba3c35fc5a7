"""Pre-tokenized token shards: the on-disk format, its reader and the ``shards`` dataset.

``tools/tokenize_data.py`` writes a folder::

    <out>/index.json               format, tokenizer (sha256 of tokenizer.json, vocab size, eos/bos
                                   ids), dtype, max token id, per split: documents, tokens, shards
    <out>/train/00000.bin          tokens of whole documents, one after the other, each document as
                                   tokenizer.encode(text, add_bos=True, add_eos=True) (for Qwen3:
                                   its tokens + <|endoftext|>); raw little-endian uint16 when the
                                   vocabulary fits in 16 bits, else uint32
    <out>/train/00000.idx          uint64 end offset (in tokens) of every document in the .bin
    <out>/validation/00000.{bin,idx}

``[training] dataset = "shards"`` reads the ``train`` split (``shards_validation``: the
``validation`` split) of the folder ``[training] dataset_path`` with ``np.memmap``.
:class:`TokenShardDataset` gives each data-parallel rank a contiguous, disjoint range of documents
(or, interleaved, every window ``r`` of ``W``), packs them into ``seq_len + 1`` windows exactly as
torchtitan's HuggingFaceTextDataset packs text (so the same documents give the same batches either
way), deals the rank's stream out to its dataloader workers a whole micro-batch each in turn (so the
batches, and each step's sequences, are those of a loader without workers, whatever their number),
and checkpoints its position as (epoch, document, offset in document, window): a resumed run
continues with the very next token.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info

from neollm.data.packing import contiguous_range, truncate_document
from neollm.errors import ConfigError

FORMAT = "neollm-token-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
DOC_INDEX_DTYPE = np.dtype("<u8")
SPLITS = ("train", "validation")
TOKENIZE_HINT = "make them with `python tools/tokenize_data.py --input <text files> --out <folder>`"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32 (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_sha256(tokenizer_dir: str | Path) -> str:
    """sha256 of ``<tokenizer_dir>/tokenizer.json`` (what identifies a tokenizer here)."""
    return sha256_file(Path(tokenizer_dir) / "tokenizer.json")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def shards_root(path: str | Path) -> Path:
    """The shard folder for a ``dataset_path``: the folder itself or its index.json."""
    p = Path(path)
    return p.parent if p.name == INDEX_NAME else p


def read_index(path: str | Path) -> dict[str, Any]:
    root = shards_root(path)
    index = root / INDEX_NAME
    if not index.is_file():
        what = "does not exist" if not root.exists() else f"has no {INDEX_NAME}"
        raise FileNotFoundError(
            f"token shards: dataset_path {str(root)!r} {what}: {TOKENIZE_HINT} and set "
            "[training] dataset_path to that folder")
    try:
        meta = json.loads(index.read_text())
    except ValueError as e:
        raise ConfigError(f"token shards: {index} is not valid JSON ({e}): rerun tools/tokenize_data.py")
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"token shards: {index} is not a {FORMAT} v{FORMAT_VERSION} index (format "
            f"{meta.get('format')!r}, version {meta.get('version')!r}): rerun tools/tokenize_data.py")
    return meta


class TokenShards:
    """One split of a shard folder: random access to its documents (read-only, memory-mapped).

    Files are opened on first use in each process (dataloader workers open their own maps).
    """

    def __init__(self, path: str | Path, split: str = "train"):
        self.root = shards_root(path)
        self.meta = read_index(self.root)
        self.split = split
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise ConfigError(
                f"token shards {str(self.root)!r} have no {split!r} split (splits: "
                f"{sorted(splits)}): tokenize one with tools/tokenize_data.py"
                + (" --validation-fraction or --validation-input" if split == "validation" else ""))
        info = splits[split]
        self.dtype = np.dtype(self.meta["dtype"])
        self.files = [s for s in info["shards"] if s["documents"] > 0]
        for s in self.files:
            for key, count, itemsize in (("file", "tokens", self.dtype.itemsize),
                                         ("index", "documents", DOC_INDEX_DTYPE.itemsize)):
                f = self.root / s[key]
                if not f.is_file():
                    raise FileNotFoundError(
                        f"token shards: {f} is listed in {self.root / INDEX_NAME} but missing: "
                        "rerun tools/tokenize_data.py on the same --out folder")
                if f.stat().st_size != s[count] * itemsize:
                    raise ConfigError(
                        f"token shards: {f} has {f.stat().st_size} bytes, {INDEX_NAME} says "
                        f"{s[count]} x {itemsize}: the file is damaged; delete it and its "
                        f"progress/ marker and rerun tools/tokenize_data.py")
        self.doc_offsets = np.cumsum([0] + [s["documents"] for s in self.files]).astype(np.int64)
        self.num_documents = int(self.doc_offsets[-1])
        self.num_tokens = int(sum(s["tokens"] for s in self.files))
        if self.num_documents == 0:
            raise ConfigError(
                f"token shards {str(self.root)!r}: the {split!r} split has no documents: "
                "tokenize more text (or another split)")
        self._maps: list[tuple[np.ndarray, np.ndarray]] | None = None

    # ------------------------------------------------------------------ metadata

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.meta["tokenizer"]

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.get("eos_id")

    @property
    def max_token_id(self) -> int:
        return int(self.meta["max_token_id"])

    def check(self, tokenizer_dir: str | Path | None, eos_id: int | None = None,
              model_vocab_size: int | None = None, setting: str = "[training] dataset_path") -> None:
        """Refuse shards of another tokenizer, or with ids the model has no embedding for."""
        where = f"token shards {str(self.root)!r} ({setting})"
        made_with = self.tokenizer
        if tokenizer_dir:
            digest = tokenizer_sha256(tokenizer_dir)
            if digest != made_with["sha256"]:
                raise ConfigError(
                    f"{where} were written with another tokenizer (tokenizer.json sha256 "
                    f"{made_with['sha256'][:12]}..., from {made_with.get('path')!r}) than [model] "
                    f"hf_assets_path {str(tokenizer_dir)!r} (sha256 {digest[:12]}...): set "
                    "hf_assets_path to the tokenizer the shards were made with, or rerun "
                    f"`python tools/tokenize_data.py --tokenizer {tokenizer_dir}` into a new folder")
        if eos_id is not None and made_with.get("eos_id") != eos_id:
            raise ConfigError(
                f"{where} separate documents with token {made_with.get('eos_id')}, but the "
                f"tokenizer's end-of-document id is {eos_id}: rerun tools/tokenize_data.py "
                "with this tokenizer")
        if model_vocab_size is not None and self.max_token_id >= model_vocab_size:
            raise ConfigError(
                f"{where} hold token id {self.max_token_id}, but the model has only "
                f"{model_vocab_size:,} embedding rows: set [model] vocab_size >= "
                f"{self.max_token_id + 1} (a multiple of 64 is fastest) or use a smaller tokenizer")

    # ------------------------------------------------------------------ documents

    def _open(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._maps is None:
            self._maps = [
                (np.memmap(self.root / s["file"], dtype=self.dtype, mode="r"),
                 np.memmap(self.root / s["index"], dtype=DOC_INDEX_DTYPE, mode="r"))
                for s in self.files
            ]
        return self._maps

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` of the split (a read-only view; EOS included)."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} of {self.num_documents}")
        s = int(np.searchsorted(self.doc_offsets, i, side="right")) - 1
        j = i - int(self.doc_offsets[s])
        tokens, ends = self._open()[s]
        start = int(ends[j - 1]) if j else 0
        return tokens[start:int(ends[j])]

    def __len__(self) -> int:
        return self.num_documents

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = None  # each process maps the files itself
        return state


def load_shards(path: str, split: str = "train") -> TokenShards:
    """DatasetConfig loader of the ``shards`` / ``shards_validation`` sources."""
    if not path:
        raise ConfigError("shards needs a folder: set [training] dataset_path to the --out folder "
                          f"of tools/tokenize_data.py ({TOKENIZE_HINT})")
    return TokenShards(path, split)


class TokenShardDataset(IterableDataset, Stateful):
    """Packed ``seq_len + 1`` windows of a split: this rank's documents, dealt to workers by micro-batch.

    Rank ``r`` of ``W`` reads documents ``contiguous_range(N, W, r)``. With ``K`` dataloader workers,
    worker ``w`` walks the same packed stream and keeps the rank's windows whose micro-batch number
    (``j // local_batch_size``) is ``w`` mod ``K``: the loader takes whole batches from its workers in
    turn, so the batches come out in stream order, as without workers. (Giving each worker its own
    contiguous block of documents instead made every micro-batch, and with one micro-batch per step every
    step, come from one block: on a corpus stored source by source, alternate steps of one source.) The
    state is the position of the next token: ``epoch`` (passes over the range so far), ``doc`` (index
    in the range), ``offset`` (tokens of that document already used) and ``window`` (the stream's
    windows packed so far, kept or not), so a resumed iterator yields exactly the windows the
    uninterrupted one would have. ``restart_each_pass``: every
    ``iter()`` starts at the first document (validation: each evaluation sees the same batches).

    ``shuffle_seed`` (``[data] shuffle_documents``): each pass reads the range's documents in a
    permuted order, a function of (seed, epoch, range) alone, so ``doc`` is a position in that
    order and a resumed run recomputes the same permutation (exact resume); None keeps the order.

    ``interleave`` (``[data] interleave_ranks``): the range is every document for every rank, so all
    ranks pack the same stream (same order, same permutation), and rank ``r`` of ``W`` keeps
    windows ``r, r + W, r + 2W, ...``: global window ``i`` of a step's ``W x B`` goes to one rank
    whatever ``W`` is, so the set of sequences per optimizer step does not depend on the number
    of ranks; the workers split the rank's windows by micro-batches as above.
    """

    def __init__(self, shards: TokenShards, seq_len: int, dp_rank: int = 0, dp_world_size: int = 1,
                 infinite: bool = True, max_doc_tokens: int = 0, name: str = "shards",
                 restart_each_pass: bool = False, shuffle_seed: int | None = None,
                 interleave: bool = False, local_batch_size: int = 1):
        self.shards = shards
        self.interleave = interleave
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.local_batch_size = max(1, local_batch_size)
        self.shuffle_seed = shuffle_seed
        self.restart_each_pass = restart_each_pass
        self.seq_len = seq_len
        self.infinite = infinite
        self.max_doc_tokens = max_doc_tokens
        self.dataset_name = name
        self.rank_range = ((0, shards.num_documents) if interleave
                           else contiguous_range(shards.num_documents, dp_world_size, dp_rank))
        if self.rank_range[0] == self.rank_range[1]:
            raise ConfigError(
                f"token shards {str(shards.root)!r} ({shards.split}) have {shards.num_documents} "
                f"documents, fewer than the {dp_world_size} data-parallel ranks: tokenize more text")
        self.eos_id = shards.eos_id
        self._epoch = 0
        self._doc = 0
        self._offset = 0
        self._window = 0

    @staticmethod
    def _workers() -> tuple[int, int]:
        """(this dataloader worker's id, number of workers); (0, 1) in the main process."""
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _tokens(self, i: int) -> np.ndarray:
        return truncate_document(self.shards.document(i), self.max_doc_tokens, self.eos_id)

    def _order(self, epoch: int, lo: int, hi: int) -> np.ndarray | None:
        """Pass ``epoch``'s document order over [lo, hi) (None: in order)."""
        if self.shuffle_seed is None:
            return None
        rng = np.random.default_rng([self.shuffle_seed, epoch, lo, hi])
        return lo + rng.permutation(hi - lo)

    def _keeps(self) -> Callable[[int], bool]:
        """Which windows of the packed stream this rank (and worker) yields."""
        worker, workers = self._workers()
        rank, world, batch = self.dp_rank, self.dp_world_size, self.local_batch_size
        if self.interleave:
            return lambda i: i % world == rank and (i // world // batch) % workers == worker
        if workers == 1:
            return lambda i: True
        return lambda i: (i // batch) % workers == worker

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        lo, hi = self.rank_range
        n = hi - lo
        if self.restart_each_pass:
            self._epoch, self._doc, self._offset, self._window = 0, 0, 0, 0
        keeps = self._keeps()
        window = self.seq_len + 1
        buf = np.empty(window, dtype=np.int64)
        epoch, doc, offset, index = self._epoch, self._doc, self._offset, self._window
        order = self._order(epoch, lo, hi)
        keep = keeps(index)
        fill = 0
        while True:
            if doc >= n:
                if not self.infinite:
                    return
                epoch, doc, offset = epoch + 1, 0, 0
                order = self._order(epoch, lo, hi)
            tokens = self._tokens(lo + doc if order is None else int(order[doc]))
            take = min(len(tokens) - offset, window - fill)
            if keep:  # other ranks' windows are only counted, not copied
                buf[fill:fill + take] = tokens[offset:offset + take]
            fill += take
            offset += take
            if offset >= len(tokens):
                doc, offset = doc + 1, 0
            if fill == window:
                fill, index = 0, index + 1
                if keep:
                    self._epoch, self._doc, self._offset, self._window = epoch, doc, offset, index
                    x = torch.from_numpy(buf.copy())
                    yield {"input": x[:-1]}, x[1:]
                keep = keeps(index)

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self._epoch, "doc": self._doc, "offset": self._offset,
                 "documents": self.shards.num_documents, "rank_range": list(self.rank_range)}
        if self.interleave:
            state["interleave"] = [self._window, self.dp_rank, self.dp_world_size, self.local_batch_size]
        else:  # the stream's window count and how it was dealt out to the workers
            state["workers"] = [self._window, self._workers()[1], self.local_batch_size]
        if self.shuffle_seed is not None:
            state["shuffle_seed"] = self.shuffle_seed
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("documents"), list(state_dict.get("rank_range", [])))
        if saved != (self.shards.num_documents, list(self.rank_range)):
            raise ConfigError(
                f"the checkpoint's data position is for {saved[0]} documents, rank range "
                f"{saved[1]}, but token shards {str(self.shards.root)!r} ({self.shards.split}) "
                f"now give {self.shards.num_documents} documents, range {list(self.rank_range)}: "
                "resume with the same shards and number of data-parallel ranks")
        if state_dict.get("shuffle_seed") != self.shuffle_seed:
            def describe(seed):
                return "in order" if seed is None else f"shuffled with seed {seed}"
            raise ConfigError(
                f"the checkpoint's data position is for documents read "
                f"{describe(state_dict.get('shuffle_seed'))}, but this run reads them "
                f"{describe(self.shuffle_seed)}: resume with the same [data] shuffle_documents / "
                "shuffle_seed")
        saved_split = state_dict.get("interleave")
        layout = [self.dp_rank, self.dp_world_size, self.local_batch_size]
        if (saved_split is None) == self.interleave or (self.interleave and list(saved_split[1:]) != layout):
            def split(value):
                return ("rank blocks" if value is None else
                        f"interleaved windows (rank {value[1]} of {value[2]}, micro-batch {value[3]})")
            now = [0, *layout] if self.interleave else None
            raise ConfigError(
                f"the checkpoint's data position is for {split(saved_split)}, but this run reads "
                f"{split(now)}: resume with the same [data] interleave_ranks, number of data-parallel "
                "ranks and [training] local_batch_size")
        window = saved_split[0] if self.interleave else self._check_workers(state_dict.get("workers"))
        self._epoch = int(state_dict["epoch"])
        self._doc = int(state_dict["doc"])
        self._offset = int(state_dict["offset"])
        self._window = int(window)

    def _check_workers(self, saved: list[int] | None) -> int:
        """The saved window count, after checking that this run deals the stream out to its workers
        as the saved one did (no saved split: a checkpoint from before the batch-wise split, when each
        of several workers read its own block of documents: its positions mean nothing here)."""
        workers = self._workers()[1]
        if saved is None:
            if workers > 1:
                raise ConfigError(
                    f"the checkpoint's data position is one of {workers} dataloader workers' positions in "
                    "their own blocks of documents (NeoLLM before the workers shared one stream); this "
                    "version cannot continue it: resume with the code that wrote it, or keep the model and "
                    "optimizer and start the data over with --checkpoint.exclude_from_loading dataloader")
            return 0
        window, saved_workers, saved_batch = saved
        if workers > 1 and (saved_workers, saved_batch) != (workers, self.local_batch_size):
            raise ConfigError(
                f"the checkpoint's data position is for {saved_workers} dataloader workers taking micro-batches "
                f"of {saved_batch}, but this run has {workers} workers and micro-batches of "
                f"{self.local_batch_size}: resume with the same [training.dataloader] num_workers and "
                "[training] local_batch_size")
        return window
