"""A held-out validation split for sources that have none (FineWeb-Edu streams only ``train``).

A document is held out when the first 8 bytes of sha256(its text), read as a fraction of 2**64,
fall below ``[data] holdout_fraction`` (default 0.01, seed 000's 1%). The rule depends on the
text alone, not on order, rank or worker, so every run, rank count and resume agrees; it is the
rule of ``tools/tokenize_data.py --validation-fraction`` (neollm/data/shard_writer.py splits by
``is_held_out``), so shards tokenized from the same stream with the same fraction hold out the
same documents.

``fineweb_edu`` (training) skips the held-out documents and ``fineweb_edu_validation`` yields
only them (``HOLDOUT_SPLITS``). The split is a ``datasets`` ``filter`` applied by NeoLLM's
dataloader builder (neollm.data.loader.build_dataset) to whatever the source's loader returns,
so it works for any ``datasets.IterableDataset`` (or map-style ``Dataset``); a streaming
dataset keeps its own ``state_dict`` through the filter (exact resume). A held-out document
costs the training stream nothing but reading it; validation reads ~1/fraction documents of
the stream per held-out one.
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any, Callable

from neollm.errors import ConfigError

DEFAULT_HOLDOUT_FRACTION = 0.01

# source key -> the side of the split it yields
HOLDOUT_SPLITS: dict[str, str] = {"fineweb_edu": "train", "fineweb_edu_validation": "validation"}


def is_held_out(text: str, fraction: float) -> bool:
    """True for the documents of the validation side (the shard writer, neollm/data/shard_writer.py, splits by it too)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h < fraction * 2.0 ** 64


def holdout_fraction(job_config: Any) -> float:
    """``[data] holdout_fraction`` (the default when the section is absent), validated."""
    data = getattr(job_config, "data", None)
    value = getattr(data, "holdout_fraction", DEFAULT_HOLDOUT_FRACTION)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(
            f"[data] holdout_fraction must be a number in [0, 1) (the share of a stream's "
            f"documents held out for validation; default {DEFAULT_HOLDOUT_FRACTION}), got {value!r}")
    return float(value)


def _keep(sample: dict, fraction: float, validation: bool, text_of: Callable[[dict], str]) -> bool:
    return is_held_out(text_of(sample), fraction) == validation


def holdout_split(data: Any, fraction: float, split: str, text_of: Callable[[dict], str]) -> Any:
    """``data`` (a ``datasets`` Dataset or IterableDataset) reduced to one side of the split.

    ``split``: "train" (documents not held out) or "validation" (only held-out ones).
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if split == "train" and fraction <= 0:
        return data
    return data.filter(partial(_keep, fraction=fraction, validation=split == "validation",
                               text_of=text_of))


def holdout_side(key: str, job_config: Any, setting: str = "[training] dataset"
                 ) -> tuple[str, float] | None:
    """(split side, fraction) for source ``key``, None for a source without a hash split.
    Refuses a validation side that would be empty (fraction 0)."""
    split = HOLDOUT_SPLITS.get(key)
    if split is None:
        return None
    fraction = holdout_fraction(job_config)
    if split == "validation" and fraction <= 0:
        raise ConfigError(
            f"{setting} {key!r} yields the documents held out by [data] holdout_fraction, which "
            f"is 0 (nothing held out): set [data] holdout_fraction > 0 (e.g. 0.01)")
    return split, fraction


def apply_holdout(key: str, data: Any, job_config: Any, text_of: Callable[[dict], str],
                  setting: str = "[training] dataset") -> Any:
    """The source ``key``'s side of the split (``data`` unchanged for sources without one)."""
    side = holdout_side(key, job_config, setting)
    return data if side is None else holdout_split(data, side[1], side[0], text_of)
