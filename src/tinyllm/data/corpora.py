"""Named corpora and user files, read as a list of documents.

Named corpora are data files of the gensim wheel's test data (read as files; gensim is never
imported), extracted once and cached under `$TINYLLM_CACHE/corpora/NAME-VERSION.txt`:
- `enwiki` (the default): English Wikipedia. Pages in the article namespace that are not
  redirects become one document each: the title, a blank line, and the body with wiki markup
  stripped by mwparserfromhell.
- `bgwiki`: Bulgarian Wikipedia, extracted the same way from its article and project namespaces
  (the excerpt holds one article, an editing guide and a 2005 discussion archive).
- `crime-and-punishment`: the Russian opening of Dostoevsky's novel (its paragraphs in Cyrillic;
  the file's English translation of them is left out), one document. Short: about 1,300 tokens.
- `lee-news`: the Lee background corpus, 300 English news stories of the Australian Broadcasting
  Corporation, one document each.

User files must be UTF-8 text: an empty file, a binary one (a NUL byte) or invalid UTF-8 is an
error naming the file (and the byte offset and line), unless `errors="replace"` (or the environment
variable `TINYLLM_CORPUS_ERRORS=replace`) asks to read invalid bytes as U+FFFD.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tinyllm.errors import CorpusError
from tinyllm.models.registry import package_dir
from tinyllm.util.fs import cache_dir, write_text_atomic

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "enwiki"
GENSIM_DATA = "test/test_data"  # the folder of the named corpora's files in the gensim wheel
GENSIM_INSTALL = "pip install --no-deps gensim==4.4.0"
DOC_SEPARATOR = "\n\n\n"  # between documents in the cached text
TEXT_SUFFIXES = (".txt", ".md", ".text")
ERRORS = ("strict", "replace")
ERRORS_ENV = "TINYLLM_CORPUS_ERRORS"


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


def load_corpus(spec: str | Path = DEFAULT_CORPUS, errors: str | None = None) -> Corpus:
    """A named corpus (a key of `NAMED`: enwiki, bgwiki, crime-and-punishment, lee-news), a
    UTF-8 text file, a `.jsonl` file or a directory of texts.

    `errors`: "strict" (invalid UTF-8 is an error) or "replace" (invalid bytes read as U+FFFD,
    with a warning); default `$TINYLLM_CORPUS_ERRORS`, else strict."""
    text = str(spec)
    errors = errors or os.environ.get(ERRORS_ENV) or "strict"
    if errors not in ERRORS:
        raise CorpusError(f"unknown corpus errors mode '{errors}'; choose {' or '.join(ERRORS)}")
    if text in NAMED:
        docs = named_documents(text)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise CorpusError(
                f"corpus '{text}' is neither a named corpus ({', '.join(NAMED)}) nor a path"
            )
        docs = _path_documents(path, errors)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"corpus '{text}' is empty: it holds no text")
    return Corpus(text, tuple(docs))


def _path_documents(path: Path, errors: str = "strict") -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"directory {path} has no text files ({', '.join(TEXT_SUFFIXES)})")
        return [_read_utf8(f, errors) for f in files]
    if path.suffix == ".jsonl":
        return list(_jsonl_documents(path, errors))
    return [_read_utf8(path, errors)]


def _read_utf8(path: Path, errors: str = "strict") -> str:
    """The text of a UTF-8 file; empty, binary and (strict) undecodable files are errors."""
    if not path.is_file():
        raise CorpusError(f"{path} is not a regular file; give a text file or a directory")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror}") from exc
    _check_not_binary(path, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if errors != "replace":
            line = data.count(b"\n", 0, exc.start) + 1
            raise CorpusError(
                f"{path} is not UTF-8 text: invalid byte 0x{data[exc.start]:02x} at byte offset "
                f"{exc.start} (line {line}); convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8), "
                f"or set {ERRORS_ENV}=replace to read invalid bytes as U+FFFD"
            ) from exc
        text = data.decode("utf-8", errors="replace")
        log.warning("%s: invalid UTF-8 bytes read as U+FFFD (first at byte %d)", path, exc.start)
    if not text.strip():
        raise CorpusError(f"{path} is empty: it holds no text; remove it or give another corpus")
    return text.removeprefix("\ufeff")


def _check_not_binary(path: Path, data: bytes) -> None:
    """Text never holds a NUL byte; UTF-16 text does, and gets a hint."""
    nul = data.find(b"\x00")
    if nul < 0:
        return
    head = data[:64]
    utf16 = head[:2] in (b"\xff\xfe", b"\xfe\xff") or 3 * head.count(0) >= len(head)
    hint = "; if it is UTF-16 text, convert it to UTF-8 first" if utf16 else ""
    raise CorpusError(f"{path} is binary, not text: NUL byte at byte offset {nul}{hint}")


def _jsonl_documents(path: Path, errors: str = "strict") -> Iterator[str]:
    for lineno, line in enumerate(_read_utf8(path, errors).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f"{path}:{lineno}: each line needs a string field 'text'")
        yield record["text"]


def named_documents(name: str) -> list[str]:
    """The documents of a named corpus, extracted from its gensim data file once and cached."""
    named = NAMED[name]
    cached = cache_dir("corpora") / f"{name}-{named.version}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8").split(DOC_SEPARATOR)
    source = package_dir("gensim", GENSIM_INSTALL) / GENSIM_DATA / named.file
    if not source.is_file():
        raise CorpusError(f"{source} is missing; reinstall with: {GENSIM_INSTALL}")
    log.warning("extracting the %s corpus from %s (once; cached in %s)", name, source, cached)
    docs = [doc for doc in named.extract(source) if doc.strip()]
    write_text_atomic(cached, DOC_SEPARATOR.join(docs))
    return docs


def _wiki_documents(path: Path, namespaces: Collection[str] = ("0",)) -> list[str]:
    """Plain-text pages of a MediaWiki dump (bz2 XML, any encoding its declaration names)."""
    return [doc for title, text in _wiki_pages(path, namespaces) if (doc := _clean(title, text))]


def _wiki_pages(path: Path, namespaces: Collection[str] = ("0",)) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of the pages in `namespaces` that are not redirects."""
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            redirect = elem.find("{*}redirect") is not None
            title = elem.findtext("{*}title") or ""
            text = elem.findtext("{*}revision/{*}text") or ""
            if ns in namespaces and not redirect and text:
                yield title, text
            elem.clear()


_CYRILLIC = re.compile(r"[\u0400-\u04ff]")


def _cyrillic_paragraphs(path: Path) -> list[str]:
    """One document: the lines of a UTF-8 file that hold Cyrillic letters, stripped."""
    lines = [ln.strip() for ln in _read_utf8(path).splitlines()]
    return ["\n".join(ln for ln in lines if _CYRILLIC.search(ln))]


def _lines(path: Path) -> list[str]:
    """One document per non-empty line of a UTF-8 file."""
    return [ln.strip() for ln in _read_utf8(path).splitlines() if ln.strip()]


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus shipped as a file of the gensim wheel's test data."""

    file: str  # under GENSIM_DATA
    version: str  # bump when the extraction changes, so caches are rebuilt
    extract: Callable[[Path], list[str]]


NAMED: dict[str, NamedCorpus] = {
    "enwiki": NamedCorpus(
        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "v2",
        _wiki_documents,
    ),
    "bgwiki": NamedCorpus(
        "bgwiki-latest-pages-articles-shortened.xml.bz2",
        "v1",
        partial(_wiki_documents, namespaces=("0", "4")),  # articles and the Wikipedia: pages
    ),
    "crime-and-punishment": NamedCorpus("crime-and-punishment.txt", "v1", _cyrillic_paragraphs),
    "lee-news": NamedCorpus("lee_background.cor", "v1", _lines),
}


_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "imagemap"}
_DROP_LINK_PREFIXES = {  # namespaces of files and categories, in English and Bulgarian
    *("file", "image", "category", "media"),
    *("файл", "картинка", "изображение", "категория", "медия"),
}
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
