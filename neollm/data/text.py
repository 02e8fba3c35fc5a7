"""Text sources tokenized on the fly: torchtitan's HuggingFaceTextDataset, plus two things.

torchtitan 0.2.2's ``HuggingFaceTextDataset`` already does what exact resume needs, and NeoLLM
keeps its packing loop and checkpoint state unchanged (checked in tests/test_data_resume.py):

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
  Here worker ``w`` of ``K`` reads the ``w``-th contiguous block of the rank's documents
  (streaming datasets split their files across workers themselves). StatefulDataLoader saves and
  restores one state per worker.
* ``[data] max_doc_tokens_factor``: documents are truncated (packing.DocumentEncoder).

It also takes the already loaded dataset instead of loading it a second time.
"""

from __future__ import annotations

from typing import Any, Callable

from datasets import Dataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import get_worker_info
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

from neollm.data.packing import DocumentEncoder


class NeoLLMTextDataset(HuggingFaceTextDataset):
    """torchtitan's packing and checkpoint state over an already loaded HF dataset.

    ``restart_each_pass``: every ``iter()`` starts at the first document with an empty buffer
    (validation: each evaluation sees the same batches).
    """

    def __init__(self, dataset_name: str, data: Any, text_processor: Callable[[dict], str],
                 tokenizer: Any, seq_len: int, dp_rank: int = 0, dp_world_size: int = 1,
                 infinite: bool = False, max_doc_tokens: int = 0, restart_each_pass: bool = False):
        # The attributes torchtitan's __iter__ / state_dict / load_state_dict use.
        self.dataset_name = dataset_name.lower()
        self._data = split_dataset_by_node(data, dp_rank, dp_world_size)
        self._tokenizer = DocumentEncoder(tokenizer, max_doc_tokens) if max_doc_tokens else tokenizer
        self.seq_len = seq_len
        self.infinite = infinite
        self._text_processor = text_processor
        self._sample_idx = 0
        self._token_buffer: list[int] = []
        self.restart_each_pass = restart_each_pass

    def _get_data_iter(self):
        info = get_worker_info()
        if isinstance(self._data, Dataset) and info is not None and info.num_workers > 1:
            part = self._data.shard(info.num_workers, info.id, contiguous=True)
            if self._sample_idx >= len(part):
                return iter([])
            return iter(part.skip(self._sample_idx))
        return super()._get_data_iter()

    def __iter__(self):
        if self.restart_each_pass:
            self._sample_idx = 0
            self._token_buffer = []  # (a streaming dataset restarts by itself on iter())
        return super().__iter__()
