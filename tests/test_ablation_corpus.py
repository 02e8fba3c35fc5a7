"""tools/prepare_ablation_corpus.py's readers on small hand-made package trees (the real .debs
are fetched at set-up, never in tests): HTML manuals become their prose without navigation, POD
files are taken as written, and every source carries its licence into the manifest."""

from __future__ import annotations

import json

from conftest import load_tool

PAGE = """<!DOCTYPE html><html><head><title>2.6. Joins</title><style>p {color: red}</style></head>
<body><div class="navheader"><table><tr><td><a href="x.html">Prev</a></td><td>Up</td></tr></table></div>
<div class="sect1"><h2 class="title">2.6. Joins Between Tables</h2>
<p>Queries can access   multiple
tables at once &amp; combine rows.</p>
<pre class="programlisting">SELECT *
  FROM weather JOIN cities ON city = name;</pre>
<ul><li><p>one</p></li><li>two<br>lines</li></ul>
<table><tr><th>city</th><td>temp</td></tr></table>
<script>var hidden = 1;</script></div>
<div class="navfooter"><p>Next: 2.7. Aggregate Functions</p></div></body></html>"""


def test_html_to_text_keeps_the_prose_and_code_and_drops_navigation():
    from neollm.data.html_text import html_to_text

    text = html_to_text(PAGE)
    paragraphs = text.split("\n\n")
    assert paragraphs[:2] == ["2.6. Joins Between Tables",  # the <head>'s title is not the page's text
                              "Queries can access multiple tables at once & combine rows."]
    assert "SELECT *\n  FROM weather JOIN cities ON city = name;" in paragraphs  # <pre> kept as written
    assert "one" in paragraphs and "two" in paragraphs and "lines" in paragraphs
    assert "| city | temp" in text
    for dropped in ("Prev", "Next: 2.7", "color: red", "hidden"):
        assert dropped not in text


def test_postgres_and_perl_sources_from_unpacked_packages(tmp_path):
    from neollm.data import ablation_corpus as corpus

    html = tmp_path / "pg/usr/share/doc/postgresql-doc-15/html"
    html.mkdir(parents=True)
    (html / "tutorial-join.html").write_text(PAGE)
    pod = tmp_path / "perl/usr/share/perl/5.36.0/pod"
    pod.mkdir(parents=True)
    (pod / "perlfaq4.pod").write_text("=head1 NAME\n\nperlfaq4 - Data Manipulation\n")
    (pg,) = corpus.package_documents("postgres", tmp_path / "pg")
    assert pg["id"] == "postgres:usr/share/doc/postgresql-doc-15/html/tutorial-join.html"
    assert pg["text"].startswith("2.6. Joins Between Tables\n\nQueries can access multiple")
    (perl,) = corpus.package_documents("perl", tmp_path / "perl")
    assert perl == {"id": "perl:usr/share/perl/5.36.0/pod/perlfaq4.pod", "source": "perl",
                    "text": "=head1 NAME\n\nperlfaq4 - Data Manipulation"}
    assert set(corpus.LICENCES) == set(corpus.SOURCES) and set(corpus.PACKAGES) < set(corpus.SOURCES)


def test_manifest_names_package_and_licence(tmp_path, monkeypatch):
    """main() over a --deb-dir: the .deb is 'unpacked' into a fake tree; the manifest records
    the package file and the licence of each source."""
    from neollm.data import ablation_corpus

    tool = load_tool("prepare_ablation_corpus")
    debs = tmp_path / "debs"
    debs.mkdir()
    (debs / "perl-doc_5.36.0-7_all.deb").write_bytes(b"")

    def fake_unpack(deb, into):
        pod = into / "usr/share/perl/5.36.0/pod"
        pod.mkdir(parents=True)
        (pod / "perlintro.pod").write_text("=head1 DESCRIPTION\n\n" + "Perl is a language. " * 20)
        return into

    monkeypatch.setattr(ablation_corpus, "unpack", fake_unpack)
    out = tmp_path / "out"
    assert tool.main(["--sources", "perl", "--deb-dir", str(debs), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"]["perl"] == {"docs": 1, "chars": 419, "validation_docs": 0,  # stripped
                                           "licence": "GPL-1+ or Artistic", "package": "perl-doc_5.36.0-7_all.deb"}
    (line,) = (out / "train.jsonl").read_text().splitlines()
    assert json.loads(line)["source"] == "perl"
