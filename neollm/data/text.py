"""Text sources tokenized on the fly: torchtitan's HuggingFaceTextDataset, plus a few things.

torchtitan 0.2.2's ``HuggingFaceTextDataset`` already does what exact resume needs, and NeoLLM
keeps its packing (the same windows, re-written here around batched tokenization) and checkpoint
state (plus the workers' split, below; checked in tests/test_data_resume.py):

* map-style ``datasets.Dataset`` (wiki_vital_en, local_text): each data-parallel rank gets a
  contiguous, disjoint block of documents (``split_dataset_by_node`` -> ``Dataset.shard(...,
  contiguous=True)``); the state is ``sample_idx`` (documents consumed) + ``token_buffer``
  (tokens read but not yet yielded), and a resumed run skips to ``sample_idx``.
* streaming ``datasets.IterableDataset`` (fineweb_edu): ``split_dataset_by_node`` gives each rank
  whole hub files when their number divides by the ranks, else every W-th document; the state
  is ``datasets``' own ``IterableDataset.state_dict()`` (file + row position) + the token buffer.

What :class:`NeoLLMTextDataset` adds:

* dataloader workers (``[training.dataloader] num_workers > 0``): torchtitan would give every
  worker the rank's whole map-style dataset, so each document would be seen once per worker.
  Here worker ``w`` of ``K`` reads the rank's documents ``w, w + K, w + 2K, ...``, so the workers'
  batches, which the loader takes in turn, hold neighbouring documents as a loader without workers
  would (a contiguous block per worker made every batch one block's: on a corpus stored topic by
  topic, alternate batches of distant topics). Streaming datasets split their files across workers
  themselves. StatefulDataLoader saves and restores one state per worker; a worker's state names
  the split (``document_split``), and one saved by the block split is refused.
* ``[data] max_doc_tokens_factor``: documents are truncated (packing.truncate_document).
* streaming + workers: ``datasets`` gives each worker whole files (shards) of the rank's part,
  and a worker without a file would yield nothing, forever (the loader would hang waiting for
  it). :func:`fit_stream_to_workers` re-shards (parquet: by row group) when the rank's part has
  fewer files than workers, and refuses the configuration when that is not enough.
* :func:`check_stream_resume`: ``datasets`` 5.0 up to its fix (huggingface/datasets#8308,
  torchtitan #3907) froze a streamed dataset's ``state_dict`` after a resume, so the *second*
  resume restarted the stream from its first document. A 10-row probe runs before a stream is
  used and refuses an affected ``datasets``.

* batched tokenization: torchtitan encodes one document per call; here ``ENCODE_CHUNK`` documents go
  to the Rust tokenizer's ``encode_batch_fast`` at once (its own threads), 1.9x one core's speed on a
  2-core machine and more where a dataloader worker has more cores to itself. The checkpoint state
  stays per document: ``sample_idx`` and the token buffer advance only as a document's tokens enter
  the buffer, and a stream's state is the one recorded right after that document was read (the live
  stream has read the rest of the chunk ahead), so resume is exact as before.
* a stream's pass counter: ``datasets`` shares one between persistent workers, and ignores a saved
  position from another pass; each worker here counts its own passes and a loaded state sets it, so
  a stream resumed in its second pass (or checkpointed before a worker read again) is exact.

It also takes the already loaded dataset instead of loading it a second time.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from datasets import Dataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import get_worker_info
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset
from torchtitan.tools.logging import logger

from neollm.data.packing import encode_documents, truncate_document
from neollm.errors import ConfigError

ENCODE_CHUNK = 128
"""Documents tokenized per ``encode_batch_fast`` call (the read-ahead of a worker: ~14k tokens at wiki length)."""


def fit_stream_to_workers(data: Any, dp_rank: int, dp_world_size: int, num_workers: int,
                          setting: str = "[training.dataloader] num_workers") -> Any:
    """This rank's part of a streaming dataset, with at least one file (shard) per dataloader
    worker: re-sharded (``IterableDataset.reshard``: parquet row groups) when it has fewer."""
    part = split_dataset_by_node(data, dp_rank, dp_world_size)
    if num_workers <= 1 or part.num_shards >= num_workers:
        return part
    if hasattr(data, "reshard"):
        part = split_dataset_by_node(data.reshard(), dp_rank, dp_world_size)
    if part.num_shards < num_workers:
        raise ConfigError(
            f"{setting} = {num_workers}, but the streamed dataset gives each of the "
            f"{dp_world_size} data-parallel ranks only {part.num_shards} file(s) (shards), and a "
            f"worker without a file would stall the loader: set {setting} <= {part.num_shards}, "
            "or split the data into more files")
    return part


def check_stream_resume() -> None:
    """Refuse a ``datasets`` whose streamed state stops advancing after ``load_state_dict``."""
    from datasets import Dataset as MapDataset
    import datasets

    stream = MapDataset.from_dict({"i": list(range(10))}).to_iterable_dataset(num_shards=1)
    it = iter(stream)
    for _ in range(2):
        next(it)
    resumed = MapDataset.from_dict({"i": list(range(10))}).to_iterable_dataset(num_shards=1)
    resumed.load_state_dict(stream.state_dict())
    it = iter(resumed)
    for _ in range(3):
        next(it)
    again = MapDataset.from_dict({"i": list(range(10))}).to_iterable_dataset(num_shards=1)
    again.load_state_dict(resumed.state_dict())
    first = next(iter(again))["i"]
    if first != 5:
        raise ConfigError(
            f"datasets {datasets.__version__} loses a streamed dataset's position after a resume "
            f"(a second resume would restart at document {first}, not 5; huggingface/datasets#8308, "
            "torchtitan #3907): install a datasets with the fix (pip install 'datasets>=5.2') "
            "or one below 5.0")


class NeoLLMTextDataset(HuggingFaceTextDataset):
    """torchtitan's packing and checkpoint state over an already loaded HF dataset.

    ``restart_each_pass``: every ``iter()`` starts at the first document with an empty buffer
    (validation: each evaluation sees the same batches).
    """

    def __init__(self, dataset_name: str, data: Any, text_processor: Callable[[dict], str],
                 tokenizer: Any, seq_len: int, dp_rank: int = 0, dp_world_size: int = 1,
                 infinite: bool = False, max_doc_tokens: int = 0, restart_each_pass: bool = False,
                 num_workers: int = 0):
        # The attributes torchtitan's state_dict / load_state_dict (and the packing loop below) use.
        self.dataset_name = dataset_name.lower()
        if isinstance(data, Dataset):
            self._data = split_dataset_by_node(data, dp_rank, dp_world_size)
        else:
            check_stream_resume()
            self._data = fit_stream_to_workers(data, dp_rank, dp_world_size, num_workers)
        self._tokenizer = tokenizer
        self._max_doc_tokens = max_doc_tokens
        self._eos_id = getattr(tokenizer, "eos_id", None)
        self._stream_state: dict | None = None  # a stream's state after the last document in the buffer
        self.seq_len = seq_len
        self.infinite = infinite
        self._text_processor = text_processor
        self._sample_idx = 0
        self._token_buffer: list[int] = []
        self.restart_each_pass = restart_each_pass

    def _pass_data(self) -> Any:
        """What this pass reads: the stream, or the map-style rows left to this worker (its every K-th
        document, from ``sample_idx`` on; None when none are left)."""
        if not isinstance(self._data, Dataset):
            return self._data
        info = get_worker_info()
        part = self._data
        if info is not None and info.num_workers > 1:
            part = part.shard(info.num_workers, info.id, contiguous=False)
        if self._sample_idx >= len(part):
            return None  # (select(range(n, n)) refuses a start at the end)
        return part.select(range(self._sample_idx, len(part))) if self._sample_idx else part

    def _documents(self):
        """(text, stream state after reading it: None for map-style data) for this pass's documents;
        map-style rows are read ``ENCODE_CHUNK`` at a time (Arrow batches, not row by row)."""
        data = self._pass_data()
        if data is None:
            return
        if not isinstance(data, Dataset):
            self._own_epoch()
            for sample in data:
                yield self._text_processor(sample), data.state_dict()  # (a copy)
            return
        for batch in data.iter(batch_size=ENCODE_CHUNK):
            columns = list(batch)
            for i in range(len(batch[columns[0]]) if columns else 0):
                yield self._text_processor({c: batch[c][i] for c in columns}), None

    def _own_epoch(self) -> None:
        """In a dataloader worker, give the stream its own pass counter. ``datasets`` keeps one counter in
        shared memory for all persistent workers (for a main process that calls set_epoch); here each
        worker re-loops its own files when they run out and bumps the counter itself, so with a shared one
        two workers' passes mixed and a stream resumed after a pass end restarted elsewhere."""
        epoch = getattr(self._data, "_epoch", None)
        if get_worker_info() is not None and isinstance(epoch, torch.Tensor):
            self._data._epoch = int(epoch)

    def _encoded_documents(self):
        """(tokens, stream state) per document, tokenized ``ENCODE_CHUNK`` documents at a time."""
        chunk: list[tuple[str, Any]] = []
        for item in self._documents():
            chunk.append(item)
            if len(chunk) == ENCODE_CHUNK:
                yield from self._encode(chunk)
                chunk = []
        yield from self._encode(chunk)

    def _encode(self, chunk):
        if not chunk:
            return
        for ids, (_, state) in zip(encode_documents(self._tokenizer, [text for text, _ in chunk]), chunk):
            if self._max_doc_tokens:
                ids = truncate_document(ids, self._max_doc_tokens, self._eos_id)
            yield ids, state

    def _packed_samples(self):
        """torchtitan's packing loop (HuggingFaceTextDataset.__iter__) over batched tokenization."""
        max_buffer_token_len = 1 + self.seq_len
        while True:
            for ids, state in self._encoded_documents():
                self._token_buffer.extend(ids)
                self._sample_idx += 1
                self._stream_state = state
                while len(self._token_buffer) >= max_buffer_token_len:
                    x = torch.LongTensor(self._token_buffer[:max_buffer_token_len])
                    self._token_buffer = self._token_buffer[max_buffer_token_len:]
                    yield {"input": x[:-1]}, x[1:]
            if not self.infinite:
                logger.warning(f"Dataset {self.dataset_name} has run out of data")
                break
            self._sample_idx = 0
            logger.warning(f"Dataset {self.dataset_name} is being re-looped")
            stream = not isinstance(self._data, Dataset)
            if stream and hasattr(self._data, "set_epoch") and hasattr(self._data, "epoch"):
                self._data.set_epoch(self._data.epoch + 1)
                self._stream_state = None

    def state_dict(self) -> dict[str, Any]:
        """A snapshot. torchtitan's returns the live token buffer, which the generator extends with
        the next document right after the yield; in a dataloader worker the state is pickled later
        by the queue's feeder thread, so under CPU load the saved buffer held tokens of batches not
        yet trained on and a resume repeated them (a streamed 2-worker resume test failed in CI)."""
        state = copy.deepcopy(super().state_dict())
        if isinstance(self._data, Dataset):
            state["document_split"] = "strided"
        elif self._stream_state is not None:
            state["data"] = copy.deepcopy(self._stream_state)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        info = get_worker_info()
        if (isinstance(self._data, Dataset) and info is not None and info.num_workers > 1
                and state_dict.get("document_split") != "strided"):
            raise ConfigError(
                f"the checkpoint's data position is one of {info.num_workers} dataloader workers' positions "
                f"in their own blocks of {self.dataset_name}'s documents (NeoLLM before the workers took "
                "every K-th document); this version cannot continue it: resume with the code that wrote "
                "it, or keep the model and optimizer and start the data over with "
                "--checkpoint.exclude_from_loading dataloader")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "document_split"})
        self._stream_state = None
        if not isinstance(self._data, Dataset):
            # Until this dataset reads a document, a checkpoint must repeat the loaded position (the live
            # stream's is its start), and the stream must resume in the saved pass: ``datasets`` ignores a
            # saved position whose epoch is not the dataset's own (a fresh one's is 0).
            self._stream_state = copy.deepcopy(state_dict["data"])
            self._own_epoch()
            epoch = state_dict["data"].get("epoch") if isinstance(state_dict["data"], dict) else None
            if epoch is not None and hasattr(self._data, "set_epoch") and getattr(self._data, "epoch", epoch) != epoch:
                self._data.set_epoch(epoch)

    def __iter__(self):
        if self.restart_each_pass:
            self._sample_idx = 0
            self._token_buffer = []  # (a streaming dataset restarts by itself on iter())
            self._stream_state = None
        return self._packed_samples()
