"""Named corpora and user files, read as a list of documents.

`enwiki`: the English Wikipedia excerpt shipped in the gensim wheel (read as a data file; gensim is
never imported). Pages in the article namespace that are not redirects become one document each:
the title, a blank line, and the body with wiki markup stripped by mwparserfromhell. The extracted
text is cached under `$TINYLLM_CACHE/corpora/`.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tinyllm.errors import CorpusError
from tinyllm.models.registry import package_dir
from tinyllm.util.fs import cache_dir, write_text_atomic

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "enwiki"
ENWIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
ENWIKI_VERSION = "v2"  # bump when the extraction changes, so caches are rebuilt
DOC_SEPARATOR = "\n\n\n"  # between documents in the cached text
TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: tuple[str, ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for doc in self.documents:
            h.update(hashlib.sha256(doc.encode()).digest())
        return h.hexdigest()[:16]


def load_corpus(spec: str | Path = DEFAULT_CORPUS) -> Corpus:
    """A named corpus (`enwiki`), a UTF-8 text file, a `.jsonl` file or a directory of texts."""
    text = str(spec)
    if text == "enwiki":
        docs = enwiki_documents()
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise CorpusError(f"corpus '{text}' is neither a named corpus (enwiki) nor a path")
        docs = _path_documents(path)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"corpus '{text}' is empty: it holds no text")
    return Corpus(text, tuple(docs))


def _path_documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"directory {path} has no text files ({', '.join(TEXT_SUFFIXES)})")
        return [_read_utf8(f) for f in files]
    if path.suffix == ".jsonl":
        return list(_jsonl_documents(path))
    return [_read_utf8(path)]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path} is not UTF-8 text (byte {exc.start}); convert it first") from exc


def _jsonl_documents(path: Path) -> Iterator[str]:
    for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f"{path}:{lineno}: each line needs a string field 'text'")
        yield record["text"]


def enwiki_documents() -> list[str]:
    """The Wikipedia excerpt as plain-text documents, extracted once and cached."""
    cached = cache_dir("corpora") / f"enwiki-{ENWIKI_VERSION}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8").split(DOC_SEPARATOR)
    source = package_dir("gensim", "pip install --no-deps gensim==4.4.0") / ENWIKI_FILE
    if not source.is_file():
        raise CorpusError(f"{source} is missing; reinstall with: pip install --no-deps gensim")
    log.warning("extracting the enwiki corpus from %s (once; cached in %s)", source, cached)
    docs = [doc for title, wikitext in _wiki_pages(source) if (doc := _clean(title, wikitext))]
    write_text_atomic(cached, DOC_SEPARATOR.join(docs))
    return docs


def _wiki_pages(path: Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of article-namespace pages that are not redirects."""
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            redirect = elem.find("{*}redirect") is not None
            title = elem.findtext("{*}title") or ""
            text = elem.findtext("{*}revision/{*}text") or ""
            if ns == "0" and not redirect and text:
                yield title, text
            elem.clear()


_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "imagemap"}
_DROP_LINK_PREFIXES = {"file", "image", "category", "media"}
_DROP_LINE = re.compile(r"^\s*(Category|File|Image|thumb)\b", re.IGNORECASE)


def _clean(title: str, wikitext: str) -> str:
    """Plain text of one page: references, tables, files and categories removed, markup stripped."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    drop = [t for t in code.filter_tags(recursive=True) if str(t.tag).lower() in _DROP_TAGS]
    drop += [
        link
        for link in code.filter_wikilinks(recursive=True)
        if ":" in str(link.title)
        and str(link.title).split(":", 1)[0].strip().lower() in _DROP_LINK_PREFIXES
    ]
    for node in drop:
        with contextlib.suppress(ValueError):  # already gone with an enclosing node
            code.remove(node)
    body = code.strip_code(normalize=True, collapse=True)
    lines = [ln.strip() for ln in body.splitlines()]
    lines = [ln for ln in lines if ln and not _DROP_LINE.match(ln)]
    return f"{title}\n\n" + "\n".join(lines) if lines else ""
