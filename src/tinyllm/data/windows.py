"""Tokenize a corpus once, split it deterministically, and cut windows.

Protocol (docs/evaluation.md):
- Tokenize each document without special tokens; documents are joined by a blank line.
- The evaluation slice is the first `EVAL_TOKENS` tokens (the first half of corpora shorter than
  twice that). Evaluation windows are cut from its start, back to back, never overlapping.
- Calibration and training windows come only from the rest: it is cut into non-overlapping windows
  and a seeded random subset is drawn, so the same seed always gives the same windows.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from tinyllm.data.corpora import Corpus
from tinyllm.errors import ConfigError, CorpusError
from tinyllm.util.fs import atomic_path, cache_dir

log = logging.getLogger(__name__)

EVAL_TOKENS = 65_536
JOIN = "\n\n"


def tokenizer_fingerprint(tokenizer: object) -> str:
    """A digest of the tokenizer's full definition (vocabulary, merges, normalizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize_corpus(corpus: Corpus, tokenizer: object) -> torch.Tensor:
    """All tokens of the corpus as a 1-D int64 tensor, cached per (corpus, tokenizer)."""
    key = f"{corpus.digest}-{tokenizer_fingerprint(tokenizer)}"
    path = cache_dir("tokens") / f"{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path).astype(np.int64))
    texts = [
        doc + (JOIN if i < len(corpus.documents) - 1 else "")
        for i, doc in enumerate(corpus.documents)
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = np.fromiter((t for doc in encoded for t in doc), dtype=np.int32)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, ids)
    return torch.from_numpy(ids.astype(np.int64))


def split(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluation slice, rest): the slice is the start of the corpus."""
    n = ids.numel()
    cut = EVAL_TOKENS if n >= 2 * EVAL_TOKENS else n // 2
    return ids[:cut], ids[cut:]


def check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2 (got {seq_len}): a window needs a target")


def eval_windows(ids: torch.Tensor, seq_len: int, windows: int, name: str) -> torch.Tensor:
    """The first `windows` back-to-back windows of the evaluation slice. [windows, seq_len]"""
    check_seq_len(seq_len)
    if windows < 1:
        raise ConfigError(f"--windows must be at least 1 (got {windows})")
    eval_ids, _ = split(ids)
    need = windows * seq_len
    if eval_ids.numel() < need:
        raise CorpusError(
            f"corpus '{name}' is too short: its evaluation slice has {eval_ids.numel()} tokens, "
            f"{windows} windows x {seq_len} need {need}; ask for fewer or shorter windows"
        )
    return eval_ids[:need].view(windows, seq_len)


def sample_windows(
    ids: torch.Tensor, seq_len: int, samples: int, seed: int, name: str
) -> torch.Tensor:
    """`samples` seeded random non-overlapping windows from outside the evaluation slice."""
    check_seq_len(seq_len)
    _, rest = split(ids)
    available = rest.numel() // seq_len
    if samples > available:
        raise CorpusError(
            f"corpus '{name}' is too small: outside its evaluation slice it has {available} "
            f"windows of {seq_len} tokens, {samples} were asked"
        )
    grid = rest[: available * seq_len].view(available, seq_len)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(available, generator=gen)[:samples].sort().values
    return grid[picks].clone()


def train_windows(ids: torch.Tensor, seq_len: int, name: str) -> torch.Tensor:
    """Every non-overlapping window outside the evaluation slice, in corpus order. [N, seq_len]"""
    check_seq_len(seq_len)
    _, rest = split(ids)
    available = rest.numel() // seq_len
    if available < 1:
        raise CorpusError(
            f"corpus '{name}' is too small to train on: outside its evaluation slice it has "
            f"{rest.numel()} tokens, fewer than one window of {seq_len}"
        )
    return rest[: available * seq_len].view(available, seq_len).clone()


def with_bos(windows: torch.Tensor, tokenizer: object) -> torch.Tensor:
    """Prepend BOS to each window only when the tokenizer adds one by default."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a")["input_ids"]
    if bos is None or not probe or probe[0] != bos:
        return windows
    col = torch.full((windows.shape[0], 1), bos, dtype=windows.dtype)
    return torch.cat([col, windows], dim=1)
