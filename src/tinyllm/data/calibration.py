"""Calibration windows for a tokenizer: seeded, from outside the evaluation slice."""

from __future__ import annotations

from pathlib import Path

import torch

from tinyllm.data.corpora import DEFAULT_CORPUS, load_corpus
from tinyllm.data.windows import sample_windows, tokenize_corpus
from tinyllm.errors import CorpusError

MIX_SEPARATOR = "+"


def calibration_windows(
    tokenizer: object,
    corpus: str | Path = DEFAULT_CORPUS,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """[samples, seq_len] token ids. A mix "enwiki+bgwiki+lee-news" (corpora joined by "+",
    when no such path exists) takes an equal share of the windows from each, so calibration is
    not tied to one language or genre."""
    texts = [load_corpus(part) for part in mix_parts(corpus)]  # every name checked first
    shares = [samples // len(texts) + (i < samples % len(texts)) for i in range(len(texts))]
    windows = [
        sample_windows(tokenize_corpus(text, tokenizer), seq_len, n, seed, text.name)
        for text, n in zip(texts, shares, strict=True)
        if n > 0 or len(texts) == 1
    ]
    if len(windows) == 1:
        return windows[0]
    mixed = torch.cat(windows)
    order = torch.randperm(mixed.shape[0], generator=torch.Generator().manual_seed(seed))
    return mixed[order]


def mix_parts(corpus: str | Path) -> list[str | Path]:
    """The corpora of a "+"-joined mix (a path that exists is one corpus, whatever its name)."""
    text = str(corpus)
    if MIX_SEPARATOR not in text or Path(text).expanduser().exists():
        return [corpus]
    parts = [p.strip() for p in text.split(MIX_SEPARATOR)]
    if any(not p for p in parts):
        raise CorpusError(f"corpus mix '{text}' has an empty part; join names with '+'")
    return parts
