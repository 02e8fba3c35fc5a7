"""NeoLLM's dataloader builders (TrainSpec ``build_dataloader_fn`` and the validation loader).

Both return torchtitan's ``ParallelAwareDataloader`` (a torchdata StatefulDataLoader), the object
torchtitan's checkpointer saves per data-parallel rank (key ``dp_rank_<r>``), so the position in
the data is part of every checkpoint. What it wraps depends on what the source's loader returns:

* ``TokenShards`` (sources ``shards`` / ``shards_validation``) -> :class:`TokenShardDataset`;
* a Hugging Face dataset (every text source) -> :class:`NeoLLMTextDataset` (torchtitan's
  HuggingFaceTextDataset with dataloader-worker splitting and document truncation).

torchtitan 0.2.2's Validator builds its loader with ``build_text_validation_dataloader``, a name
it imports into ``torchtitan.components.validate``; NeoLLM's validator builder
(neollm.data.validation) points that name at :func:`build_neollm_validation_dataloader`, so
``[validation] dataset`` may be any NeoLLM source, shards included. Validation passes restart at the first document each time (the same
held-out batches at every evaluation). When the training source has a ``<name>_validation`` twin
(``wiki_vital_en``, ``shards``, ``fineweb_edu``), ``[validation] dataset`` left at torchtitan's
default (``c4_validation``) means that twin, and ``[validation] dataset_path`` left unset means
``[training] dataset_path``: ``[validation] enable = true`` alone validates on the held-out
split of the training data.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.config import JobConfig

from neollm.data.holdout import apply_holdout, holdout_fraction, holdout_side
from neollm.data.packing import max_doc_tokens, max_doc_tokens_factor
from neollm.data.shards import TokenShardDataset, TokenShards
from neollm.data.text import NeoLLMTextDataset
from neollm.errors import ConfigError


def model_vocab_size(job_config: JobConfig) -> int | None:
    """Embedding rows of the configured NeoLLM model (None for another model spec)."""
    if job_config.model.name != "neollm":
        return None
    override = getattr(job_config.model, "vocab_size", 0) or 0
    if override > 0:
        return override
    from neollm.model.args import FLAVORS

    flavor = FLAVORS.get(job_config.model.flavor)
    return flavor.vocab_size if flavor is not None else None


def _source(name: str, setting: str):
    from torchtitan.hf_datasets.text_datasets import DATASETS

    key = name.lower()
    if key not in DATASETS:
        raise ConfigError(f"{setting} {name!r} is unknown: choose one of {sorted(DATASETS)}")
    return key, DATASETS[key]


TORCHTITAN_DEFAULT_VALIDATION = "c4_validation"


def validation_source(job_config: JobConfig) -> tuple[str, str | None]:
    """``[validation] dataset`` and its path (see the module doc for the defaults).

    Left at torchtitan's default (c4_validation, a hub dataset) while the training source has a
    ``<name>_validation`` twin (wiki_vital_en, shards, fineweb_edu), the twin is used:
    ``[validation] enable = true`` alone then validates on the held-out split of the training data.
    """
    from torchtitan.hf_datasets.text_datasets import DATASETS

    name, path = job_config.validation.dataset, job_config.validation.dataset_path
    training = job_config.training
    twin = f"{training.dataset.lower()}_validation"
    if name.lower() == TORCHTITAN_DEFAULT_VALIDATION and twin in DATASETS and training.dataset.lower() != "c4":
        name = twin
    if not path and name.lower() == twin:
        path = training.dataset_path
    return name, path


def open_source(name: str, path: str | None, setting: str = "[training] dataset"):
    """(registry key, DatasetConfig, loaded data) for a configured source."""
    key, source = _source(name, setting)
    return key, source, source.loader(path or source.path)


def check_shards(shards: TokenShards, job_config: JobConfig, eos_id: int | None,
                 setting: str = "[training] dataset_path") -> None:
    shards.check(job_config.model.hf_assets_path, eos_id, model_vocab_size(job_config), setting)


def build_dataset(name: str, path: str | None, tokenizer: Any, job_config: JobConfig, seq_len: int,
                  dp_rank: int, dp_world_size: int, infinite: bool, validation: bool = False):
    """The IterableDataset for one source (checked against the tokenizer and the model)."""
    section = "[validation]" if validation else "[training]"
    key, source, data = open_source(name, path, f"{section} dataset")
    limit = max_doc_tokens(job_config, seq_len)
    if isinstance(data, TokenShards):
        check_shards(data, job_config, getattr(tokenizer, "eos_id", None), f"{section} dataset_path")
        return TokenShardDataset(data, seq_len, dp_rank, dp_world_size, infinite=infinite,
                                 max_doc_tokens=limit, name=key, restart_each_pass=validation,
                                 shuffle_seed=None if validation else shuffle_seed(job_config, key),
                                 interleave=not validation and interleave_ranks(job_config, key),
                                 local_batch_size=(job_config.validation if validation
                                                   else job_config.training).local_batch_size)
    data = apply_holdout(key, data, job_config, source.sample_processor, f"{section} dataset")
    loader_config = (job_config.validation if validation else job_config.training).dataloader
    return NeoLLMTextDataset(key, data, source.sample_processor, tokenizer, seq_len, dp_rank,
                             dp_world_size, infinite=infinite, max_doc_tokens=limit,
                             restart_each_pass=validation, num_workers=loader_config.num_workers)


def shuffle_seed(job_config: JobConfig, key: str | None = None) -> int | None:
    """``[data] shuffle_seed`` when ``[data] shuffle_documents`` is on (None: off), for training
    source ``key``; refused for a text source (only shards are shuffled)."""
    data = getattr(job_config, "data", None)
    if not getattr(data, "shuffle_documents", False):
        return None
    seed = getattr(data, "shuffle_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"[data] shuffle_seed must be a whole number >= 0, got {seed!r}")
    if key is not None and key not in SHARD_SOURCES:
        raise ConfigError(
            f"[data] shuffle_documents applies to pre-tokenized shards, not [training] dataset "
            f"{key!r}: tokenize it with tools/tokenize_data.py and train with dataset = \"shards\", "
            "or set shuffle_documents = false")
    return seed


def interleave_ranks(job_config: JobConfig, key: str | None = None) -> bool:
    """``[data] interleave_ranks`` for training source ``key``; refused for a text source."""
    on = bool(getattr(getattr(job_config, "data", None), "interleave_ranks", False))
    if on and key is not None and key not in SHARD_SOURCES:
        raise ConfigError(
            f"[data] interleave_ranks applies to pre-tokenized shards, not [training] dataset {key!r}: "
            "tokenize it with tools/tokenize_data.py and train with dataset = \"shards\", or set "
            "interleave_ranks = false")
    return on


def loader_kwargs(loader_config) -> dict[str, Any]:
    """``[training.dataloader]`` as StatefulDataLoader arguments. ``pin_memory`` only where a
    CUDA device exists (the trainer copies batches with ``non_blocking=True``: from pinned
    memory the copy overlaps the GPU's work); ``prefetch_factor`` / ``persistent_workers`` only
    with workers (a TOML's GPU settings then also run with ``--training.dataloader.num_workers 0``)."""
    import torch

    kwargs = asdict(loader_config)
    kwargs["pin_memory"] = bool(kwargs.get("pin_memory")) and torch.cuda.is_available()
    if not kwargs.get("num_workers"):
        kwargs["prefetch_factor"] = None
        kwargs["persistent_workers"] = False
    return kwargs


def _dataloader(dataset, dp_rank: int, dp_world_size: int, batch_size: int, loader_config):
    kwargs = {**loader_kwargs(loader_config), "batch_size": batch_size}
    return ParallelAwareDataloader(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, **kwargs)


def build_neollm_dataloader(dp_world_size: int, dp_rank: int, tokenizer: Any, job_config: JobConfig,
                            infinite: bool = True) -> ParallelAwareDataloader:
    """TrainSpec ``build_dataloader_fn``: ``[training] dataset`` for this data-parallel rank."""
    t = job_config.training
    ds = build_dataset(t.dataset, t.dataset_path, tokenizer, job_config, t.seq_len, dp_rank,
                       dp_world_size, infinite)
    return _dataloader(ds, dp_rank, dp_world_size, t.local_batch_size, t.dataloader)


def build_neollm_validation_dataloader(dp_world_size: int, dp_rank: int, tokenizer: Any,
                                       job_config: JobConfig, infinite: bool = False
                                       ) -> ParallelAwareDataloader:
    """``[validation] dataset`` for this rank (torchtitan's Validator calls it)."""
    v = job_config.validation
    name, path = validation_source(job_config)
    ds = build_dataset(name, path, tokenizer, job_config, v.seq_len, dp_rank, dp_world_size,
                       infinite, validation=True)
    return _dataloader(ds, dp_rank, dp_world_size, v.local_batch_size, v.dataloader)


def check_data(job_config: JobConfig, dp_world_size: int = 1, eos_id: int | None = None) -> None:
    """Preflight: the data settings and, for shards, tokenizer / vocabulary / rank checks.

    (Text sources are opened by preflight's own check_dataset; the validation source here.)
    """
    max_doc_tokens_factor(job_config)
    holdout_fraction(job_config)
    training_key = _source(job_config.training.dataset, "[training] dataset")[0]
    shuffle_seed(job_config, training_key)
    interleave_ranks(job_config, training_key)
    sources = [("[training]", job_config.training.dataset, job_config.training.dataset_path)]
    if job_config.validation.enable:
        sources.append(("[validation]", *validation_source(job_config)))
    for section, name, path in sources:
        key, source = _source(name, f"{section} dataset")
        if section == "[validation]" and key == TORCHTITAN_DEFAULT_VALIDATION:
            raise ConfigError(
                f"[validation] dataset is torchtitan's default {key!r} (C4 from the hub): set it to "
                "a held-out NeoLLM source: wiki_vital_en_validation, shards_validation (a split "
                "made by tools/tokenize_data.py), fineweb_edu_validation, or local_text with "
                "[validation] dataset_path")
        holdout_side(key, job_config, f"{section} dataset")
        if section == "[training]" and key not in SHARD_SOURCES:
            continue  # text: preflight's check_dataset opened it already
        data = source.loader(path or source.path)
        if isinstance(data, TokenShards):
            check_shards(data, job_config, eos_id, f"{section} dataset_path")
            if data.num_documents < dp_world_size:
                raise ConfigError(
                    f"token shards {str(data.root)!r} ({data.split}) have {data.num_documents} "
                    f"documents, fewer than the {dp_world_size} data-parallel ranks: tokenize more "
                    f"text or use fewer ranks ({section} dataset_path)")


SHARD_SOURCES = {"shards", "shards_validation"}
