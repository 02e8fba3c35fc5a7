"""Readable text of a manual's HTML page (DocBook/Publican output such as the PostgreSQL manual
or the Debian Administrator's Handbook): the prose, code and tables, without navigation.

Standard library only (html.parser). Block elements start new paragraphs; ``<pre>`` keeps its
line breaks; ``script``/``style``/``head`` and navigation blocks (a ``class`` naming navheader,
navfooter, toc, ...) are dropped.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

SKIP_TAGS = {"script", "style", "head", "noscript", "svg"}
SKIP_CLASSES = {"navheader", "navfooter", "toc", "breadcrumbs", "docnav", "footnotes-nav", "navigation",
                "legalnotice", "titlepage-nav", "skip"}
BLOCK_TAGS = {"p", "div", "section", "article", "br", "li", "dt", "dd", "tr", "table", "ul", "ol", "dl",
              "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "figure", "figcaption", "title",
              "caption", "hr"}
VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr", "source"}


class _Extractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, starts a skipped subtree)
        self.skipping = 0
        self.in_pre = 0

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        skip = tag in SKIP_TAGS or bool(classes & SKIP_CLASSES)
        if tag not in VOID_TAGS:
            self.stack.append((tag, skip))
            self.skipping += skip
            self.in_pre += tag == "pre"
        if not self.skipping and tag in BLOCK_TAGS:
            self.parts.append("\n\n")
        elif not self.skipping and tag in ("td", "th"):
            self.parts.append(" | ")

    def handle_endtag(self, tag):
        if tag in VOID_TAGS or not any(t == tag for t, _ in self.stack):
            return
        while self.stack:  # close up to the matching tag (HTML leaves some unclosed)
            open_tag, skip = self.stack.pop()
            self.skipping -= skip
            self.in_pre -= open_tag == "pre"
            if open_tag == tag:
                break
        if not self.skipping and tag in BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.skipping:
            return
        self.parts.append(data if self.in_pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """The page's text: paragraphs separated by a blank line, whitespace inside them collapsed."""
    parser = _Extractor()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p if "\n" in p else p.strip() for p in paragraphs if p.strip())
