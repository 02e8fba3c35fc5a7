#!/usr/bin/env python
"""Build the largest real local corpus we can get offline, for ablation runs.

Sources (fetched at set-up time from the Debian archive; nothing is committed):

* ``wiki``   — the Wikipedia vital-article leads that ``tools/prepare_corpus.py`` prepares
  (data/wiki_vital_en/{train,validation}.jsonl; run that first);
* ``python`` — the Python 3.11 documentation's reST sources (Debian ``python3.11-doc``),
  one document per file;
* ``kernel`` — the Linux kernel documentation's reST sources (Debian ``linux-doc-6.1``),
  one document per file;
* ``gcide``  — the GNU Collaborative International Dictionary of English (Debian
  ``dict-gcide``, dictd format), one document per entry. Dictionary markup and 19th-century
  style: bulk filler, so it can be left out with ``--sources``;
* ``postgres`` — the PostgreSQL 15 manual (Debian ``postgresql-doc-15``, PostgreSQL licence),
  its HTML pages as text (neollm/data/html_text.py), one document per page;
* ``perl``   — the Perl 5.36 documentation's POD sources (Debian ``perl-doc``, GPL-1+ or
  Artistic), one document per file.

Licences: wiki CC BY-SA 4.0; python3.11-doc PSF-2.0; linux-doc GPL-2.0; dict-gcide GPL-2+;
postgresql-doc-15 PostgreSQL; perl-doc GPL-1+ or Artistic (each package's
usr/share/doc/<package>/copyright; recorded in manifest.json). The corpus is built at set-up and
never committed. ``--sources wiki,python,kernel,gcide`` rebuilds the 18.9M-token corpus of the
2026-12 ablations.

Writes ``<out>/train.jsonl`` and ``<out>/validation.jsonl`` (``{"id", "source", "text"}``; the
wiki split is kept as prepared, other documents go to validation when a hash of their id falls
under ``--validation-percent``) and ``<out>/manifest.json`` (package versions, document and
character counts per source). Documents shorter than ``--min-chars`` are dropped.

    python tools/prepare_ablation_corpus.py                       # apt-get download the .debs
    python tools/prepare_ablation_corpus.py --deb-dir /path/debs  # offline: .debs fetched elsewhere
    python tools/tokenize_data.py --input data/ablation_corpus/train.jsonl \\
        --validation-input data/ablation_corpus/validation.jsonl --out data/shards/ablation_corpus
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neollm.data.ablation_corpus import SOURCES, CorpusError, build_corpus

REPO = Path(__file__).resolve().parents[1]

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "data/ablation_corpus")
    ap.add_argument("--sources", default=",".join(SOURCES), help=f"comma list of {', '.join(SOURCES)}")
    ap.add_argument("--deb-dir", type=Path, help="folder holding the .deb files (offline)")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache/debs", help="where downloaded .debs are kept")
    ap.add_argument("--validation-percent", type=float, default=1.0)
    ap.add_argument("--min-chars", type=int, default=200)
    opts = ap.parse_args(argv)
    sources = [s for s in opts.sources.split(",") if s]
    unknown = set(sources) - set(SOURCES)
    if unknown:
        ap.error(f"unknown source(s) {sorted(unknown)}: choose from {', '.join(SOURCES)}")
    try:
        build_corpus(opts.out, sources, opts.deb_dir, opts.cache, opts.validation_percent, opts.min_chars)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {opts.out}/train.jsonl, validation.jsonl and manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
