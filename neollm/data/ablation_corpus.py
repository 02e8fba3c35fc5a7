"""The ablation corpus builder behind tools/prepare_ablation_corpus.py (its docstring lists the
sources, licences and outputs): Debian documentation packages and the wiki corpus as
``{"id", "source", "text"}`` documents in ``train.jsonl`` / ``validation.jsonl`` plus a manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: data/wiki_vital_en and .cache/debs live there
PACKAGES = {"python": "python3.11-doc", "kernel": "linux-doc-6.1", "gcide": "dict-gcide",
            "postgres": "postgresql-doc-15", "perl": "perl-doc"}
LICENCES = {"wiki": "CC-BY-SA-4.0", "python": "PSF-2.0", "kernel": "GPL-2.0", "gcide": "GPL-2+",
            "postgres": "PostgreSQL", "perl": "GPL-1+ or Artistic"}
SOURCES = ("wiki", "python", "kernel", "gcide", "postgres", "perl")
DICTD_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


class CorpusError(RuntimeError):
    """A missing input or tool; the message says what to do."""


def decode_dictd_number(text: str) -> int:
    """dictd index numbers are base 64, most significant digit first, in DICTD_ALPHABET."""
    value = 0
    for ch in text:
        value = value * 64 + DICTD_ALPHABET.index(ch)
    return value


def in_validation(doc_id: str, percent: float) -> bool:
    """Deterministic split by a hash of the document id (any machine, any order)."""
    digest = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return digest % 10_000 < percent * 100


def fetch_debs(packages: list[str], deb_dir: Path | None, cache: Path) -> dict[str, Path]:
    """Path of each package's .deb: from --deb-dir, else the cache, else ``apt-get download``."""
    found: dict[str, Path] = {}
    for package in packages:
        for folder in (deb_dir, cache):
            if folder is not None:
                hits = sorted(folder.glob(f"{package}_*.deb"))
                if hits:
                    found[package] = hits[-1]
                    break
        if package in found:
            continue
        if deb_dir is not None:
            raise CorpusError(f"--deb-dir {deb_dir} has no {package}_*.deb: fetch it with "
                              f"`apt-get download {package}` where the Debian archive is reachable")
        if shutil.which("apt-get") is None:
            raise CorpusError(f"no apt-get here to fetch {package}: download {package}_*.deb on a Debian "
                              "machine (`apt-get download ...`) and pass its folder with --deb-dir")
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["apt-get", "download", package], cwd=cache, capture_output=True, text=True)
        hits = sorted(cache.glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not hits:
            raise CorpusError(f"`apt-get download {package}` failed ({proc.stderr.strip()[-300:]}); "
                              "without access to the Debian archive, fetch the .deb elsewhere and use --deb-dir")
        found[package] = hits[-1]
    return found


def unpack(deb: Path, into: Path) -> Path:
    if shutil.which("dpkg-deb") is None:
        raise CorpusError("dpkg-deb is needed to unpack the Debian packages (apt-get install dpkg)")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return into


def rst_documents(root: Path, pattern: str, source: str) -> Iterator[dict]:
    for path in sorted(root.glob(pattern)):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        yield {"id": f"{source}:{path.relative_to(root)}", "source": source, "text": text}


def html_documents(root: Path, pattern: str, source: str) -> Iterator[dict]:
    from neollm.data.html_text import html_to_text

    for path in sorted(root.glob(pattern)):
        text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        yield {"id": f"{source}:{path.relative_to(root)}", "source": source, "text": text}


def package_documents(source: str, root: Path) -> Iterator[dict]:
    """The documents of one unpacked Debian package."""
    if source == "gcide":
        return gcide_documents(root)
    if source == "postgres":
        return html_documents(root, "usr/share/doc/postgresql-doc-15/html/*.html", source)
    pattern = {"python": "usr/share/doc/python3.11/html/_sources/**/*.rst.txt",
               "kernel": "usr/share/doc/linux-doc-*/html/_sources/**/*.rst.txt",
               "perl": "usr/share/perl/*/pod/*.pod"}[source]
    return rst_documents(root, pattern, source)


def gcide_documents(root: Path) -> Iterator[dict]:
    dict_dir = root / "usr/share/dictd"
    data = gzip.decompress((dict_dir / "gcide.dict.dz").read_bytes())  # dictzip is gzip
    seen: set[tuple[int, int]] = set()
    for line in (dict_dir / "gcide.index").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database"):
            continue
        start, length = decode_dictd_number(parts[1]), decode_dictd_number(parts[2])
        if (start, length) in seen:  # several headwords (inflections, variants) share one entry
            continue
        seen.add((start, length))
        text = data[start:start + length].decode("utf-8", errors="replace").strip()
        yield {"id": f"gcide:{parts[0]}:{start}", "source": "gcide", "text": text}


def wiki_documents(split: str) -> Iterator[dict]:
    path = REPO / "data/wiki_vital_en" / f"{split}.jsonl"
    if not path.is_file():
        raise CorpusError(f"{path} is missing: run `python tools/prepare_corpus.py` first")
    with path.open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            yield {"id": f"wiki:{record['id']}", "source": "wiki", "text": record["text"]}


def build_corpus(out: Path, sources: list[str], deb_dir: Path | None, cache: Path, validation_percent: float,
                 min_chars: int) -> None:
    """Write ``out``/train.jsonl, validation.jsonl and manifest.json from ``sources`` (names of
    SOURCES); CorpusError with a one-line message when a package or source fails."""
    debs = fetch_debs([PACKAGES[s] for s in sources if s in PACKAGES], deb_dir, cache)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"sources": {}, "validation_percent": validation_percent,
                      "min_chars": min_chars}
    with tempfile.TemporaryDirectory() as tmp, \
            (out / "train.jsonl.tmp").open("w", encoding="utf-8") as train, \
            (out / "validation.jsonl.tmp").open("w", encoding="utf-8") as validation:
        for source in sources:
            stats = {"docs": 0, "chars": 0, "validation_docs": 0, "licence": LICENCES[source]}
            if source == "wiki":
                streams = [(doc, split == "validation") for split in ("train", "validation")
                           for doc in wiki_documents(split)]
            else:
                deb = debs[PACKAGES[source]]
                stats["package"] = deb.name
                root = unpack(deb, Path(tmp) / source)
                docs = package_documents(source, root)
                streams = ((doc, in_validation(doc["id"], validation_percent)) for doc in docs)
            for doc, held_out in streams:
                if len(doc["text"]) < min_chars:
                    continue
                (validation if held_out else train).write(json.dumps(doc, ensure_ascii=False) + "\n")
                stats["docs"] += 1
                stats["chars"] += len(doc["text"])
                stats["validation_docs"] += held_out
            if not stats["docs"]:
                raise CorpusError(f"source {source!r} gave no documents: is the package layout as expected?")
            manifest["sources"][source] = stats
            print(f"{source}: {stats['docs']:,} documents, {stats['chars']:,} characters "
                  f"({stats['validation_docs']:,} held out)", flush=True)
    for name in ("train", "validation"):
        (out / f"{name}.jsonl.tmp").replace(out / f"{name}.jsonl")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
