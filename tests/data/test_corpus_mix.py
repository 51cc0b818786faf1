"""Calibration from a mix of corpora ("enwiki+bgwiki+lee-news")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinyllm.data.calibration import calibration_windows, mix_parts
from tinyllm.errors import CorpusError


def _rows(t: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in t.tolist()}


def test_mix_takes_an_equal_share_from_each_corpus(tokenizer) -> None:
    mix = calibration_windows(tokenizer, "bgwiki+lee-news", samples=5, seq_len=32, seed=3)
    bg = calibration_windows(tokenizer, "bgwiki", samples=3, seq_len=32, seed=3)
    news = calibration_windows(tokenizer, "lee-news", samples=2, seq_len=32, seed=3)
    assert mix.shape == (5, 32)
    assert _rows(mix) == _rows(bg) | _rows(news)  # 3 + 2: the first corpus takes the remainder
    again = calibration_windows(tokenizer, "bgwiki+lee-news", samples=5, seq_len=32, seed=3)
    assert torch.equal(mix, again)  # seeded


def test_mix_parts(tmp_path: Path) -> None:
    assert mix_parts("enwiki") == ["enwiki"]
    assert mix_parts(" enwiki + bgwiki ") == ["enwiki", "bgwiki"]
    odd = tmp_path / "a+b.txt"
    odd.write_text("text")
    assert mix_parts(str(odd)) == [str(odd)]  # an existing path is one corpus
    with pytest.raises(CorpusError, match="empty part"):
        mix_parts("enwiki++bgwiki")
    with pytest.raises(CorpusError, match="neither a named corpus"):
        calibration_windows(object(), "enwiki+nosuchcorpus", samples=2, seq_len=16)
