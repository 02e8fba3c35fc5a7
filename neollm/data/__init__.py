"""NeoLLM's data layer. Importing this package registers its sources in torchtitan's ``DATASETS``
(NeoLLM's validator, ``validation.py``, is the TrainSpec's ``build_validator_fn``).

Sources (``[training] dataset`` / ``dataset_path``; ``[validation] dataset`` / ``dataset_path``):

=========================  ==================================================================
``wiki_vital_en``          default corpus, ``data/wiki_vital_en/train.jsonl`` (tools/prepare_corpus.py)
``wiki_vital_en_validation``  its held-out ``validation.jsonl``
``local_text``             your files: a folder, file or glob of .jsonl/.json/.parquet/.txt
``fineweb_edu``            FineWeb-Edu streamed from the hub, ``repo[:config]`` (default sample-10BT),
                           without the documents held out for validation
``fineweb_edu_validation``  the same stream's held-out documents (``[data] holdout_fraction``)
``shards``                 pre-tokenized shards (tools/tokenize_data.py ``--out`` folder), train split
``shards_validation``      the same folder's validation split
=========================  ==================================================================

Every source goes through the same packing (``packing.py``): each document is
``tokenizer.encode(text, add_bos=True, add_eos=True)`` (Qwen3: its tokens + ``<|endoftext|>``),
documents are concatenated and cut into ``seq_len + 1`` windows. ``[data]
max_doc_tokens_factor = 4`` truncates every document to 4 x seq_len tokens (seed 000's option).

Ranks and workers: data-parallel rank r of W reads the r-th contiguous block of documents (for a
streaming source: whole hub files, or every W-th document); within a rank, dataloader worker w
of K (``[training.dataloader] num_workers``) reads the rank's documents w, w + K, ... for local
text, keeps the rank's micro-batches w, w + K, ... of one packed stream for shards (so batches come
out in the order a loader without workers gives), and for a streaming source whole files of the
rank's part (re-sharded by parquet row group when there are fewer files than workers, refused when
that is not enough: text.fit_stream_to_workers). The GPU
configs read with 4 workers, pinned memory and prefetch 4 (2 workers for shards);
tools/bench_data.py measures each source against what a model consumes.
Token shards with ``[data] interleave_ranks = true`` instead: every rank walks the same packed
stream of all documents and keeps windows r, r + W, ... (workers take whole batches in turn), so
a step's global batch is the same sequences whatever W is (neollm/data/shards.py).

Exact resume: the dataloader is torchtitan's ParallelAwareDataloader, saved in every checkpoint
per rank and worker; its dataset state is (epoch, document, offset, window) for shards, (documents
consumed, token buffer, the workers' split) for local text, and ``datasets``' own state_dict + token
buffer for streaming.

Pre-tokenized training::

    python tools/tokenize_data.py                      # data/wiki_vital_en -> data/shards/wiki_vital_en
    ./run_train.sh --training.dataset shards --training.dataset_path data/shards/wiki_vital_en \\
        --validation.enable --validation.freq 500 --validation.steps 20

Shards remember the sha256 of the tokenizer.json they were made with; the trainer (and the
check before torchrun) refuses them with another ``[model] hf_assets_path`` or when they hold
ids beyond the model's ``vocab_size``.

Validation: ``[validation] enable = true``, ``freq`` (steps between evaluations), ``steps``
(batches per evaluation; set it, -1 can hang ranks of unequal data), ``local_batch_size``,
``seq_len``. With a training source that has a ``*_validation`` twin (``wiki_vital_en``,
``shards``) ``enable`` alone is enough; otherwise set ``dataset`` (and ``dataset_path``). The
loss is logged as ``validate step: N  loss: X`` and as ``validation_metrics/loss``.

New keys:

* ``[data] holdout_fraction = 0.01`` (``holdout.py``): the share of a stream's documents held out
  by a hash of their text, the rule of ``tools/tokenize_data.py --validation-fraction``.
  ``fineweb_edu`` skips them and ``fineweb_edu_validation`` (what ``[validation] enable`` alone
  picks with ``fineweb_edu`` training) yields only them. 0 holds nothing out.
* ``[data] shuffle_documents = false``, ``[data] shuffle_seed = 0``: shards (training only) are
  read in a new document order every pass, each rank and worker permuting its own documents
  from (seed, pass); the checkpointed position is in that order, so resume stays exact (and is
  refused with another seed or with shuffling switched). Text sources refuse it.
* ``[model] allow_vocab_mismatch = false``: the model's ``vocab_size`` must be the tokenizer's
  size (largest id + 1), or that size padded up to a multiple of 64 or 128; true allows a larger
  embedding (a smaller one is always refused).
"""

from neollm.data.loader import (
    build_neollm_dataloader,
    build_neollm_validation_dataloader,
)
from neollm.data.shards import TokenShardDataset, TokenShards
from neollm.data.sources import (
    NEOLLM_DATASETS,
    load_fineweb_edu,
    load_local_text,
    load_wiki_vital_en,
    register_datasets,
)

register_datasets()

__all__ = [
    "NEOLLM_DATASETS",
    "TokenShardDataset",
    "TokenShards",
    "build_neollm_dataloader",
    "build_neollm_validation_dataloader",
    "load_fineweb_edu",
    "load_local_text",
    "load_wiki_vital_en",
    "register_datasets",
]
