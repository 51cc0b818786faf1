"""Calibration windows for a tokenizer: seeded, from outside the evaluation slice."""

from __future__ import annotations

from pathlib import Path

import torch

from tinyllm.data.corpora import DEFAULT_CORPUS, load_corpus
from tinyllm.data.windows import sample_windows, tokenize_corpus


def calibration_windows(
    tokenizer: object,
    corpus: str | Path = DEFAULT_CORPUS,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """[samples, seq_len] token ids."""
    text = load_corpus(corpus)
    return sample_windows(tokenize_corpus(text, tokenizer), seq_len, samples, seed, text.name)
