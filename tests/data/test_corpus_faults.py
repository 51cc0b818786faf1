"""Hostile corpora: each is a CorpusError that names the file (and where in it), or, in the
opt-in lenient mode, text with U+FFFD in place of invalid bytes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tinyllm.data.corpora import load_corpus
from tinyllm.data.windows import eval_windows, sample_windows, tokenize_corpus, train_windows
from tinyllm.errors import CorpusError

BAD = b"line one\nline two \xff\xfe then more\n"
OFFSET = BAD.index(b"\xff")


def test_bad_utf8_names_file_offset_and_line(tmp_path: Path):
    p = tmp_path / "bad.txt"
    p.write_bytes(BAD)
    with pytest.raises(CorpusError) as info:
        load_corpus(p)
    message = str(info.value)
    assert str(p) in message
    assert f"invalid byte 0xff at byte offset {OFFSET} (line 2)" in message
    assert "TINYLLM_CORPUS_ERRORS=replace" in message


def test_lenient_mode_replaces_invalid_bytes(tmp_path: Path, monkeypatch, caplog):
    p = tmp_path / "bad.txt"
    p.write_bytes(BAD)
    doc = load_corpus(p, errors="replace").documents[0]
    assert doc.startswith("line one\nline two \ufffd") and doc.endswith("then more\n")
    assert f"first at byte {OFFSET}" in caplog.text
    monkeypatch.setenv("TINYLLM_CORPUS_ERRORS", "replace")  # the CLI and recipes use this
    assert load_corpus(p).documents[0] == doc
    with pytest.raises(CorpusError, match="unknown corpus errors mode 'ignore'"):
        load_corpus(p, errors="ignore")


def test_empty_file(tmp_path: Path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    with pytest.raises(CorpusError, match=rf"{re.escape(str(p))} is empty"):
        load_corpus(p)


def test_binary_file(tmp_path: Path):
    p = tmp_path / "model.txt"
    p.write_bytes(b"PK\x03\x04" + bytes(range(256)))
    with pytest.raises(
        CorpusError, match=r"model\.txt is binary, not text: NUL byte at byte offset 4"
    ):
        load_corpus(p)


def test_utf16_text_gets_a_hint(tmp_path: Path):
    p = tmp_path / "notes.txt"
    p.write_bytes("hello world".encode("utf-16"))
    with pytest.raises(CorpusError, match=r"binary, not text: .*UTF-16 text, convert it to UTF-8"):
        load_corpus(p)


def test_utf8_bom_is_dropped(tmp_path: Path):
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfhello")
    assert load_corpus(p).documents == ("hello",)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_is_refused_not_read(tmp_path: Path):
    p = tmp_path / "pipe.txt"
    os.mkfifo(p)
    with pytest.raises(CorpusError, match="not a regular file"):
        load_corpus(p)  # reading it would block forever


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"caf\xe9", r"bad\.txt is not UTF-8 text: invalid byte 0xe9 at byte offset 3"),
        (b"", r"bad\.txt is empty"),
        (b"a\x00b", r"bad\.txt is binary, not text: NUL byte at byte offset 1"),
    ],
)
def test_directory_names_the_bad_file(tmp_path: Path, content: bytes, message: str):
    (tmp_path / "a.txt").write_text("fine text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.txt").write_bytes(content)
    with pytest.raises(CorpusError, match=message) as info:
        load_corpus(tmp_path)
    assert str(tmp_path / "sub" / "bad.txt") in str(info.value)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([b'{"text": "ok"}', b'{"text": "ok"}', b'{"text": oops}'], r"c\.jsonl:3: not valid JSON"),
        (
            [b'{"text": "ok"}', b'{"body": "x"}'],
            r"c\.jsonl:2: each line needs a string field 'text'",
        ),
        ([b'{"text": "ok"}', b'{"text": 5}'], r"c\.jsonl:2: each line needs a string field 'text'"),
        ([b'["text"]'], r"c\.jsonl:1: each line needs"),
        (
            [b'{"text": "ok"}', b'{"text": "caf\xe9"}'],
            r"c\.jsonl is not UTF-8 .*offset 28 \(line 2\)",
        ),
    ],
)
def test_jsonl_names_the_line(tmp_path: Path, lines: list[bytes], message: str):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(CorpusError, match=message):
        load_corpus(p)


def test_jsonl_of_empty_texts_is_empty(tmp_path: Path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["", "  "]) + "\n")
    with pytest.raises(CorpusError, match="is empty"):
        load_corpus(p)


def test_file_shorter_than_one_window(tmp_path: Path, tokenizer):
    p = tmp_path / "short.txt"
    p.write_text("The quick brown fox.")
    corpus = load_corpus(p)
    ids = tokenize_corpus(corpus, tokenizer)
    assert 0 < ids.numel() < 64
    name = re.escape(str(p))
    with pytest.raises(CorpusError, match=rf"corpus '{name}' is too short"):
        eval_windows(ids, 64, 1, corpus.name)
    with pytest.raises(CorpusError, match=rf"corpus '{name}' is too small"):
        sample_windows(ids, 64, 1, 0, corpus.name)
    with pytest.raises(CorpusError, match=rf"corpus '{name}' is too small to train on"):
        train_windows(ids, 64, corpus.name)
