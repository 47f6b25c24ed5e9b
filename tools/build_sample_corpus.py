#!/usr/bin/env python
"""Build data/sample/: a small multi-domain corpus in the Pile's own format, from text available offline.

Domains (our honest source names, and the Pile domain each stands in for):

| source         | Pile domain (meta.pile_set_name) | text                                                   | licence          |
|----------------|----------------------------------|--------------------------------------------------------|------------------|
| python-docs    | Wikipedia (en)                   | Python's HTML documentation (Debian python3-doc) as text | PSF License v2 (examples: 0BSD) |
| python-stdlib  | Github                           | .py files of the running interpreter's standard library | PSF License v2   |
| licence-texts  | FreeLaw                          | /usr/share/common-licenses, split into sections        | verbatim copying permitted by each text |

Output (deterministic for the same inputs): ``train.jsonl.zst`` and ``val.jsonl.zst`` with one JSON object
per line, ``{"text": ..., "meta": {"pile_set_name": ..., "source": ..., "path": ...}}``; documents of all
domains interleaved as in the Pile's shards; about 5% of each domain held out for validation.

Requires the Debian package python3-doc: ``apt-get update && apt-get install -y python3-doc``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
from html.parser import HTMLParser
from typing import Dict, Iterator, List, Tuple

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_mile.atomic_io import atomic_open  # noqa: E402

SOURCES = {
    "python-docs": "Wikipedia (en)",
    "python-stdlib": "Github",
    "licence-texts": "FreeLaw",
}
MAX_DOC_CHARS = 48_000  # longer texts are cut at blank lines into several documents
VAL_PER_MILLE = 50  # held out for validation: about 5% of each domain
ZSTD_LEVEL = 19


class _SphinxText(HTMLParser):
    """Plain text of the main content of a Sphinx page (``div.body``): block elements become line breaks,
    ``pre`` blocks are kept verbatim, navigation, scripts and header links are dropped."""

    _BLOCKS = {"p", "div", "section", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "tr", "table",
               "ul", "ol", "dl", "blockquote", "pre", "br", "hr", "figure", "caption"}
    _SKIP = {"script", "style"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: List[str] = []
        self._depth = 0  # div depth inside div.body; 0 = outside
        self._pre = 0
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self._depth == 0:
            if tag == "div" and "body" in (attrs.get("class") or "").split():
                self._depth = 1
            return
        if tag == "div":
            self._depth += 1
        if tag in self._SKIP or (tag == "a" and "headerlink" in (attrs.get("class") or "")):
            self._skip += 1
        if tag == "pre":
            self._pre += 1
        if tag in self._BLOCKS:
            self.out.append("\n")
        if tag == "li":
            self.out.append("* ")

    def handle_endtag(self, tag):
        if self._depth == 0:
            return
        if tag == "div":
            self._depth -= 1
        if tag in self._SKIP or tag == "a" and self._skip:
            self._skip = max(0, self._skip - 1)
        if tag == "pre":
            self._pre -= 1
        if tag in self._BLOCKS:
            self.out.append("\n")

    def handle_data(self, data):
        if self._depth == 0 or self._skip:
            return
        self.out.append(data if self._pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [line.rstrip() for line in "".join(self.out).split("\n")]
        text = "\n".join(lines)
        text = re.sub(r"\n{3,}", "\n\n", text)
        # Sphinx's pilcrow and the paragraph sign of header links (in case one slipped through).
        return text.replace("\u00b6", "").strip()


def html_to_text(markup: str) -> str:
    parser = _SphinxText()
    parser.feed(markup)
    parser.close()
    return parser.text()  # character references are already decoded (convert_charrefs)


def chunk(text: str, limit: int = MAX_DOC_CHARS) -> List[str]:
    """Cut ``text`` at blank lines into pieces of at most about ``limit`` characters."""
    if len(text) <= limit:
        return [text]
    pieces, current, size = [], [], 0
    for para in text.split("\n\n"):
        if current and size + len(para) > limit:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def find_python_docs() -> str:
    for candidate in sorted(glob.glob("/usr/share/doc/python3*/html")):
        if os.path.isfile(os.path.join(candidate, "library", "index.html")):
            return os.path.realpath(candidate)
    sys.exit("error: Python's HTML documentation is not installed. It comes from the Debian package "
             "python3-doc: run `apt-get update && apt-get install -y python3-doc`, then rerun this script.")


def _stable_order(paths: List[str], salt: str) -> List[str]:
    """A deterministic, content-independent shuffle, so a size budget samples the whole tree."""
    return sorted(paths, key=lambda p: hashlib.sha256((salt + p).encode()).hexdigest())


def docs_documents(budget: int) -> Iterator[Tuple[str, str]]:
    root = find_python_docs()
    pages = [p for p in glob.glob(os.path.join(root, "**", "*.html"), recursive=True)
             if "/_" not in p[len(root):] and not p.endswith(("genindex.html", "search.html", "py-modindex.html"))
             and "/genindex-" not in p]
    used = 0
    for page in _stable_order([os.path.relpath(p, root) for p in pages], "docs"):
        with open(os.path.join(root, page), encoding="utf-8", errors="strict") as f:
            text = html_to_text(f.read())
        if len(text) < 200:
            continue
        for piece in chunk(text):
            yield page, piece
            used += len(piece)
        if used >= budget:
            return


def stdlib_documents(budget: int) -> Iterator[Tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, root)
        # Tests and bundled third-party code (site-packages) are left out: not the PSF-licensed library.
        if rel.startswith(("site-packages", "test", "idlelib/idle_test", "lib2to3/tests")) or "/test" in rel:
            continue
        files.append(rel)
    used = 0
    for rel in _stable_order(files, "code"):
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            continue
        if len(text.strip()) < 200:
            continue
        for piece in chunk(text):
            yield rel, piece
            used += len(piece)
        if used >= budget:
            return


def licence_documents() -> Iterator[Tuple[str, str]]:
    root = "/usr/share/common-licenses"
    seen = set()
    for name in sorted(os.listdir(root)):
        path = os.path.realpath(os.path.join(root, name))
        if path in seen or not os.path.isfile(path):
            continue  # GPL -> GPL-3 and the like: each text once
        seen.add(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        for piece in chunk(text, 6_000):
            yield os.path.basename(path), piece


def _held_out(source: str, path: str, index: int) -> bool:
    digest = hashlib.sha256(f"{source}:{path}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 1000 < VAL_PER_MILLE


def build(output_dir: str, docs_budget: int, code_budget: int) -> Dict[str, Dict[str, int]]:
    import zstandard

    splits: Dict[str, List[dict]] = {"train": [], "val": []}
    stats: Dict[str, Dict[str, int]] = {}
    producers = {
        "python-docs": docs_documents(docs_budget),
        "python-stdlib": stdlib_documents(code_budget),
        "licence-texts": licence_documents(),
    }
    for source, documents in producers.items():
        for index, (path, text) in enumerate(documents):
            split = "val" if _held_out(source, path, index) else "train"
            splits[split].append({"text": text, "meta": {"pile_set_name": SOURCES[source], "source": source,
                                                         "path": path}})
            s = stats.setdefault(source, {"train": 0, "val": 0, "chars": 0})
            s[split] += 1
            s["chars"] += len(text)
    os.makedirs(output_dir, exist_ok=True)
    for split, records in splits.items():
        # Interleave the domains, as the Pile's shards do, in a deterministic order.
        records.sort(key=lambda r: hashlib.sha256(json.dumps(r["meta"], sort_keys=True).encode()
                                                  + r["text"][:64].encode()).hexdigest())
        raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        path = os.path.join(output_dir, f"{split}.jsonl.zst")
        with atomic_open(path, "wb") as f:
            f.write(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw))
        print(f"wrote {path}: {len(records):,} documents, {len(raw) / 2**20:.2f} MB uncompressed, "
              f"{os.path.getsize(path) / 2**20:.2f} MB compressed")
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(__file__), "..", "data", "sample"))
    parser.add_argument("--docs-chars", type=int, default=3_500_000, help="Characters of Python documentation.")
    parser.add_argument("--code-chars", type=int, default=3_000_000, help="Characters of standard-library code.")
    args = parser.parse_args()
    stats = build(os.path.normpath(args.output_dir), args.docs_chars, args.code_chars)
    for source, s in stats.items():
        print(f"  {source} -> {SOURCES[source]}: {s['train']:,} train / {s['val']:,} val documents, "
              f"{s['chars'] / 2**20:.2f} M characters")
    print(f"  Python {sys.version.split()[0]} standard library from {sysconfig.get_paths()['stdlib']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
