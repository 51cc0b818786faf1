import json
from pathlib import Path

import pytest

from tinyllm.data.corpora import load_corpus
from tinyllm.errors import CorpusError


def test_text_file(corpus_file: Path):
    c = load_corpus(corpus_file)
    assert len(c.documents) == 1 and c.documents[0].startswith("The quick")


def test_jsonl(tmp_path: Path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["one doc", "two doc"]) + "\n")
    assert load_corpus(p).documents == ("one doc", "two doc")


def test_jsonl_without_text_field(tmp_path: Path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CorpusError, match=r"c.jsonl:1: .*'text'"):
        load_corpus(p)


def test_directory_of_texts(tmp_path: Path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert load_corpus(tmp_path).documents == ("first", "second")


def test_empty_corpus(tmp_path: Path):
    p = tmp_path / "empty.txt"
    p.write_text("  \n")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(p)


def test_not_utf8(tmp_path: Path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("café".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(p)


def test_unknown_corpus():
    with pytest.raises(CorpusError, match="neither a named corpus"):
        load_corpus("no-such-corpus")
