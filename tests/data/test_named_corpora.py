"""The named corpora read from the gensim wheel's test data: their text, cache and splits."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyllm.data import corpora as C
from tinyllm.data.calibration import calibration_windows
from tinyllm.data.windows import split, tokenize_corpus
from tinyllm.errors import CorpusError
from tinyllm.eval.evaluate import evaluation_windows

CYRILLIC = re.compile(r"[\u0400-\u04ff]")


def cyrillic_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(bool(CYRILLIC.match(c)) for c in letters) / len(letters)


def test_bgwiki_is_bulgarian_wikipedia_as_plain_text():
    docs = C.load_corpus("bgwiki").documents
    assert [d.split("\n", 1)[0] for d in docs] == [
        "Григориански календар",
        "Уикипедия:Редактиране на страници",
        "Уикипедия:Разговори/Архив/2005/октомври-ноември-декември",
    ]
    text = "\n".join(docs)
    assert cyrillic_share(text) > 0.9
    article = docs[0]  # markup stripped (the discussion quotes some in <nowiki>, as text)
    assert "[[" not in article and "{{" not in article and "'''" not in article
    assert "Категория:Календари" not in article  # its category link is dropped


def test_crime_and_punishment_is_the_russian_text_only():
    (doc,) = C.load_corpus("crime-and-punishment").documents
    assert doc.startswith("В начале июля, в чрезвычайно жаркое время")
    assert len(doc.splitlines()) == 3 and all(CYRILLIC.search(ln) for ln in doc.splitlines())
    assert "young man" not in doc  # the file's English translation is left out


def test_lee_news_is_one_story_per_line():
    docs = C.load_corpus("lee-news").documents
    assert len(docs) == 300 and all("\n" not in d and d == d.strip() for d in docs)
    assert docs[0].startswith("Hundreds of people have been forced to vacate their homes")


def test_named_corpus_is_cached_under_its_version(monkeypatch):
    first = C.load_corpus("lee-news")
    cached = (
        Path(os.environ["TINYLLM_CACHE"])
        / "corpora"
        / f"lee-news-{C.NAMED['lee-news'].version}.txt"
    )
    assert cached.read_text(encoding="utf-8").split(C.DOC_SEPARATOR) == list(first.documents)

    def no_source(path: Path) -> list[str]:
        raise AssertionError("extracted again despite the cache")

    monkeypatch.setitem(
        C.NAMED,
        "lee-news",
        C.NAMED["lee-news"].__class__(
            C.NAMED["lee-news"].file, C.NAMED["lee-news"].version, no_source
        ),
    )
    assert C.load_corpus("lee-news").digest == first.digest


def test_unknown_name_lists_the_named_corpora():
    with pytest.raises(CorpusError, match="enwiki, bgwiki, crime-and-punishment, lee-news"):
        C.load_corpus("ruwiki")


def test_evaluation_first_calibration_from_the_rest(tokenizer):
    ids = tokenize_corpus(C.load_corpus("bgwiki"), tokenizer)
    head, _ = split(ids)
    windows, name = evaluation_windows(tokenizer, "bgwiki", seq_len=64, windows=3)
    assert name == "bgwiki"
    assert torch.equal(windows[:, -64:].flatten(), head[: 3 * 64])
    calib = calibration_windows(tokenizer, "bgwiki", samples=4, seq_len=64, seed=0)
    rest = ids[head.numel() :].unfold(0, 64, 64)
    assert all(any(torch.equal(w, r) for r in rest) for w in calib)  # cut from outside the slice


def test_short_corpus_refuses_more_windows_than_it_has(tokenizer):
    ids = tokenize_corpus(C.load_corpus("crime-and-punishment"), tokenizer)
    fit = split(ids)[0].numel() // 256
    assert evaluation_windows(tokenizer, "crime-and-punishment", 256, fit)[0].shape[0] == fit
    with pytest.raises(CorpusError, match=r"'crime-and-punishment' is too short"):
        evaluation_windows(tokenizer, "crime-and-punishment", 256, fit + 1)
    with pytest.raises(CorpusError, match=r"'crime-and-punishment' is too small"):
        calibration_windows(tokenizer, "crime-and-punishment", samples=fit + 1, seq_len=256)


def test_cli_eval_on_a_named_corpus(tiny_dir: Path):
    args = ["eval", str(tiny_dir), "--corpus", "lee-news", "--seq-len", "16", "--windows", "2"]
    env = {**os.environ, "COLUMNS": "200"}
    p = subprocess.run(
        [sys.executable, "-m", "tinyllm.cli", *args], capture_output=True, text=True, env=env
    )
    assert p.returncode == 0, p.stderr
    assert "lee-news" in p.stdout and "perplexity" in p.stdout


def test_cli_help_names_every_named_corpus():
    from typing import get_type_hints

    from tinyllm.cli._common import CalibCorpusOpt
    from tinyllm.cli.inspect import eval_

    corpus_opt = get_type_hints(eval_, include_extras=True)["corpus"]
    for opt in (CalibCorpusOpt, corpus_opt):
        help_text = opt.__metadata__[0].help
        assert all(name in help_text for name in C.NAMED), help_text
