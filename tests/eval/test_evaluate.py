from pathlib import Path

import pytest
import torch

import tinyllm
from tests.conftest import tiny_model, tiny_tokenizer
from tinyllm.core.kernels import OneDNNLinear
from tinyllm.data.corpora import load_corpus
from tinyllm.data.windows import eval_windows, tokenize_corpus
from tinyllm.errors import ConfigError, CorpusError, TokenizerMismatchError
from tinyllm.eval.perplexity import token_nll


def test_perplexity_matches_a_direct_computation(tokenizer, corpus_file: Path):
    model = tiny_model(vocab=len(tokenizer))
    r = tinyllm.evaluate(model, tokenizer, corpus=corpus_file, seq_len=16, windows=6, fast=False)
    ids = tokenize_corpus(load_corpus(corpus_file), tokenizer)
    w = eval_windows(ids, 16, 6, "t")
    with torch.no_grad():
        logits = model(w).logits
    expected = token_nll(logits[:, :-1], w[:, 1:]).double().mean().exp().item()
    assert r.tokens == 6 * 15
    assert r.perplexity == pytest.approx(expected, rel=1e-5)
    assert r.kld is None and r.top1_agreement is None
    assert r.bits_per_weight == 32.0
    assert r.peak_rss_bytes > 0 and r.tokens_per_second > 0


def test_fast_kernels_match_plain_path(tokenizer, corpus_file: Path):
    model = tiny_model(vocab=len(tokenizer))
    a = tinyllm.evaluate(model, tokenizer, corpus=corpus_file, seq_len=16, windows=4, fast=False)
    b = tinyllm.evaluate(model, tokenizer, corpus=corpus_file, seq_len=16, windows=4, fast=True)
    assert b.perplexity == pytest.approx(a.perplexity, rel=1e-4)
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())  # originals restored
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 2 * 7 + 1


def test_reference_against_itself(tokenizer, corpus_file: Path):
    model = tiny_model(vocab=len(tokenizer))
    r = tinyllm.evaluate(
        model, tokenizer, corpus=corpus_file, seq_len=16, windows=4, reference=(model, tokenizer)
    )
    assert r.kld == pytest.approx(0.0, abs=1e-6)
    assert r.top1_agreement == 1.0


def test_reference_against_another_model(tokenizer, corpus_file: Path):
    a = tiny_model(vocab=len(tokenizer), seed=0)
    b = tiny_model(vocab=len(tokenizer), seed=1)
    r = tinyllm.evaluate(
        a, tokenizer, corpus=corpus_file, seq_len=16, windows=4, reference=(b, tokenizer)
    )
    assert r.kld > 0.0 and r.top1_agreement < 1.0


def test_reference_with_other_tokenizer(tokenizer, corpus_file: Path):
    other = tiny_tokenizer(text="completely different training text " * 50)
    model = tiny_model(vocab=len(tokenizer))
    with pytest.raises(TokenizerMismatchError):
        tinyllm.evaluate(model, tokenizer, corpus=corpus_file, reference=(model, other))


def test_corpus_too_short_for_windows(tokenizer, corpus_file: Path):
    model = tiny_model(vocab=len(tokenizer))
    with pytest.raises(CorpusError, match="too short"):
        tinyllm.evaluate(model, tokenizer, corpus=corpus_file, seq_len=512, windows=40)


def test_seq_len_below_two(tokenizer, corpus_file: Path):
    model = tiny_model(vocab=len(tokenizer))
    with pytest.raises(ConfigError):
        tinyllm.evaluate(model, tokenizer, corpus=corpus_file, seq_len=1)
