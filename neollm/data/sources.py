"""NeoLLM's text sources, as torchtitan 0.2.2 ``DatasetConfig`` entries.

torchtitan calls ``loader(path)`` when the dataset is built (trainer start), with ``path`` =
``[training] dataset_path`` or the default below, then ``sample_processor(sample)`` per document.
Every loader either returns the data asked for or raises one error that says what to change
(FileNotFoundError or ``ConfigError``, which the launcher prints as one line); none of them
falls back to other data.

Map-style ``datasets.Dataset`` objects are returned where the data is local, because
torchtitan resumes those by sample index (``Dataset.skip``) after a checkpoint load.
"""

from __future__ import annotations

import glob
import os
from functools import partial
from pathlib import Path
from typing import Any

from torchtitan.hf_datasets import DatasetConfig

from neollm.data.shards import load_shards
from neollm.errors import ConfigError

TEXT_COLUMN = "text"

WIKI_VITAL_EN_PATH = "data/wiki_vital_en"
SHARDS_PATH = "data/shards/wiki_vital_en"  # tools/tokenize_data.py's default --out
PREPARE_HINT = "run `python tools/prepare_corpus.py` (or set [training] dataset_path)"

FINEWEB_EDU_REPO = "HuggingFaceFW/fineweb-edu"
FINEWEB_EDU_DEFAULT_CONFIG = "sample-10BT"
HUB_PROBE_TIMEOUT_S = 5.0

# local_text: file suffix -> datasets builder. .json and .jsonl share the json builder and may
# be mixed; anything else mixed is an error.
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def text_sample(sample: dict[str, Any]) -> str:
    """The document text of one sample (all NeoLLM sources use a ``text`` column)."""
    return sample[TEXT_COLUMN]


# ----------------------------------------------------------------------------- wiki_vital_en


def _wiki_vital_en_file(path: str, split: str) -> Path:
    p = Path(path)
    f = p / f"{split}.jsonl" if p.is_dir() or not p.suffix else p
    if not f.is_file():
        raise FileNotFoundError(f"wiki_vital_en corpus file {f} not found: {PREPARE_HINT}")
    return f


def load_wiki_vital_en(path: str, split: str = "train"):
    """Default corpus (Wikipedia vital-article leads) made by tools/prepare_corpus.py.

    ``path`` is the corpus folder (``<split>.jsonl`` is read from it) or one .jsonl file.
    Loaded map-style so a resumed run continues at the right document.
    """
    from datasets import load_dataset

    f = _wiki_vital_en_file(path, split)
    return _check_text_column(load_dataset("json", data_files=str(f), split="train"), str(f))


# ----------------------------------------------------------------------------- local_text


def _resolve_local_files(path: str) -> list[str]:
    """A directory (searched recursively), one file, or a glob -> a sorted list of files."""
    hint = "set [training] dataset_path (--training.dataset_path) to an existing file, folder or glob"
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(
                f"local_text: no files match training.dataset_path={path!r}: {hint}")
    elif os.path.isdir(path):
        files = sorted(
            str(f) for f in Path(path).rglob("*")
            if f.is_file() and f.suffix in LOCAL_BUILDERS and not f.name.startswith(".")
        )
        if not files:
            raise FileNotFoundError(
                f"local_text: folder training.dataset_path={path!r} has no "
                f"{'/'.join('*' + s for s in LOCAL_BUILDERS)} files: {hint}")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(
            f"local_text: training.dataset_path={path!r} does not exist: {hint}")
    return files


def _builder_for(files: list[str], path: str) -> str:
    by_suffix: dict[str, list[str]] = {}
    for f in files:
        by_suffix.setdefault(Path(f).suffix, []).append(f)
    unknown = [s for s in by_suffix if s not in LOCAL_BUILDERS]
    if unknown:
        example = by_suffix[unknown[0]][0]
        raise ConfigError(
            f"local_text: training.dataset_path={path!r} includes {example!r}; supported file "
            f"types are {', '.join('*' + s for s in LOCAL_BUILDERS)}. Narrow the path or glob.")
    builders = {LOCAL_BUILDERS[s] for s in by_suffix}
    if len(builders) > 1:
        counts = ", ".join(f"{len(v)} *{s}" for s, v in sorted(by_suffix.items()))
        raise ConfigError(
            f"local_text: training.dataset_path={path!r} mixes file types ({counts}); use one "
            "type per dataset: point dataset_path at a glob such as 'dir/**/*.jsonl'.")
    return builders.pop()


def _check_text_column(ds, where: str):
    if TEXT_COLUMN not in ds.column_names:
        raise ConfigError(
            f"{where}: no {TEXT_COLUMN!r} column (columns: {ds.column_names}); NeoLLM reads the "
            f"document text from a column named {TEXT_COLUMN!r}: rename it in the files.")
    return ds


def load_local_text(path: str):
    """User-supplied text: a folder, a file or a glob of *.jsonl/*.json/*.parquet/*.txt.

    json/parquet rows need a ``text`` column; a .txt file is one document. Map-style, so
    checkpoints resume by document index.
    """
    from datasets import load_dataset

    if not path:
        raise ConfigError("local_text needs files: set [training] dataset_path "
                         "(--training.dataset_path) to a file, folder or glob.")
    files = _resolve_local_files(path)
    builder = _builder_for(files, path)
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    ds = load_dataset(builder, data_files=files, split="train", **kwargs)
    return _check_text_column(ds, f"local_text {path!r}")


def open_local_texts(path: str, text_column: str = TEXT_COLUMN, setting: str = "--input"):
    """For tools (tokenize_data, train/trim_tokenizer): the files ``path`` names, resolved as
    local_text resolves them, as a map-style Dataset of the one column ``text_column``."""
    from datasets import load_dataset

    def reword(e: Exception) -> str:
        return (str(e).replace("local_text: training.dataset_path", setting)
                .replace("set [training] dataset_path (--training.dataset_path)", f"set {setting}"))

    try:
        files = _resolve_local_files(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(reword(e)) from None
    try:
        builder = _builder_for(files, path)
    except ConfigError as e:
        raise ConfigError(reword(e)) from None
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    ds = load_dataset(builder, data_files=files, split="train", **kwargs)
    if text_column not in ds.column_names:
        raise ConfigError(f"{setting} {path!r}: no {text_column!r} column (columns: "
                          f"{ds.column_names}): choose the column with --text-column")
    return ds.select_columns([text_column])


def text_batches(ds, count: int, batch_size: int = 1000):
    """The first ``count`` texts of a one-column Dataset from open_local_texts, in lists of
    ``batch_size`` (the tokenizer trainers' input)."""
    column = ds.column_names[0]
    for start in range(0, count, batch_size):
        yield [str(text) for text in ds[start:min(start + batch_size, count)][column]]


# ----------------------------------------------------------------------------- fineweb_edu


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline_reason() -> str | None:
    """Why the HF hub can't be used, or None if a quick request reaches it."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_true(var):
            return f"{var} is set"
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "huggingface_hub is in offline mode"
    # One quick request instead of letting datasets retry for ~25 s (5 retries with backoff)
    # on a dead network. The session honours HF_ENDPOINT and proxy settings. Any HTTP answer,
    # even an error status, means the hub is reachable.
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - transport errors differ across httpx versions
        return f"{constants.ENDPOINT} did not answer ({type(e).__name__}: {e})"
    return None


class HubUnreachableError(ConfigError, RuntimeError):
    """The hub can't be reached. A RuntimeError, and a ConfigError so the launcher prints it
    as one line: the fix is a config change (train on local data)."""


def _hub_unreachable(repo: str, reason: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"fineweb_edu streams {repo} from the Hugging Face hub, but the hub is unreachable "
        f"({reason}). To train on local data instead, pass "
        "`--training.dataset local_text --training.dataset_path <files>` (jsonl/json/parquet/txt "
        "with a 'text' column), or use the default corpus `--training.dataset wiki_vital_en` "
        "after `python tools/prepare_corpus.py`; or prepare FineWeb-Edu parquet shards on a "
        "connected machine and point local_text at them.")


def parse_hub_path(path: str) -> tuple[str, str]:
    """``"HuggingFaceFW/fineweb-edu:sample-100BT"`` -> (repo, config); config defaults to sample-10BT."""
    repo, _, name = (path or FINEWEB_EDU_REPO).partition(":")
    return repo or FINEWEB_EDU_REPO, name or FINEWEB_EDU_DEFAULT_CONFIG


def load_fineweb_edu(path: str):
    """FineWeb-Edu streamed from the hub (too large to download); needs network access.

    ``path``: ``repo[:config]``. Fails fast with a RuntimeError naming the local alternatives
    when the hub can't be reached.
    """
    from datasets import load_dataset

    repo, name = parse_hub_path(path)
    reason = _hub_offline_reason()
    if reason is not None:
        raise _hub_unreachable(repo, reason)
    try:
        return load_dataset(repo, name=name, split="train", streaming=True)
    except ConnectionError as e:  # datasets' "Couldn't reach ..." and hub OfflineModeIsEnabled
        raise _hub_unreachable(repo, str(e)) from e
    except Exception as e:  # transport errors of httpx/requests, by class name
        if any(c.__name__ in {"TransportError", "RequestError", "TimeoutException",
                              "LocalEntryNotFoundError", "ConnectionError", "Timeout"}
               for c in type(e).__mro__):
            raise _hub_unreachable(repo, f"{type(e).__name__}: {e}") from e
        raise


# ----------------------------------------------------------------------------- registry


NEOLLM_DATASETS: dict[str, DatasetConfig] = {
    "wiki_vital_en": DatasetConfig(
        path=WIKI_VITAL_EN_PATH, loader=load_wiki_vital_en, sample_processor=text_sample),
    "wiki_vital_en_validation": DatasetConfig(
        path=WIKI_VITAL_EN_PATH,
        loader=partial(load_wiki_vital_en, split="validation"),
        sample_processor=text_sample),
    "local_text": DatasetConfig(path="", loader=load_local_text, sample_processor=text_sample),
    "fineweb_edu": DatasetConfig(
        path=f"{FINEWEB_EDU_REPO}:{FINEWEB_EDU_DEFAULT_CONFIG}",
        loader=load_fineweb_edu, sample_processor=text_sample),
    # The same stream; NeoLLM's dataloader keeps only the documents that [data]
    # holdout_fraction holds out of fineweb_edu (neollm/data/holdout.py).
    "fineweb_edu_validation": DatasetConfig(
        path=f"{FINEWEB_EDU_REPO}:{FINEWEB_EDU_DEFAULT_CONFIG}",
        loader=load_fineweb_edu, sample_processor=text_sample),
    # Pre-tokenized shards (tools/tokenize_data.py): the loader returns a TokenShards, which
    # neollm.data.loader reads itself (there is no text to process).
    "shards": DatasetConfig(path=SHARDS_PATH, loader=load_shards, sample_processor=text_sample),
    "shards_validation": DatasetConfig(
        path=SHARDS_PATH, loader=partial(load_shards, split="validation"),
        sample_processor=text_sample),
}


def register_datasets() -> None:
    """Add NeoLLM's sources to torchtitan's DATASETS (idempotent; names are lower case,
    as torchtitan lower-cases ``[training] dataset`` before the lookup)."""
    from torchtitan.hf_datasets.text_datasets import DATASETS

    DATASETS.update(NEOLLM_DATASETS)
