import pytest
import torch

from tinyllm.data import windows as W
from tinyllm.data.corpora import Corpus
from tinyllm.errors import ConfigError, CorpusError


def test_split_small_and_large():
    small = torch.arange(1000)
    ev, rest = W.split(small)
    assert ev.numel() == 500 and rest[0] == 500
    big = torch.arange(3 * W.EVAL_TOKENS)
    ev, rest = W.split(big)
    assert ev.numel() == W.EVAL_TOKENS and rest[0] == W.EVAL_TOKENS


def test_eval_windows_are_the_start_back_to_back():
    ids = torch.arange(1000)
    w = W.eval_windows(ids, seq_len=10, windows=5, name="t")
    assert w.shape == (5, 10)
    assert torch.equal(w.flatten(), torch.arange(50))


def test_eval_windows_too_short():
    with pytest.raises(CorpusError, match="too short"):
        W.eval_windows(torch.arange(100), seq_len=10, windows=6, name="t")


@pytest.mark.parametrize("seq_len", [0, 1])
def test_seq_len_below_two(seq_len):
    with pytest.raises(ConfigError, match="at least 2"):
        W.eval_windows(torch.arange(100), seq_len=seq_len, windows=1, name="t")


def test_sample_windows_seeded_and_outside_eval_slice():
    ids = torch.arange(2000)
    a = W.sample_windows(ids, 10, 20, seed=3, name="t")
    b = W.sample_windows(ids, 10, 20, seed=3, name="t")
    c = W.sample_windows(ids, 10, 20, seed=4, name="t")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 1000  # the evaluation slice is the first half here
    assert len(set(a[:, 0].tolist())) == 20  # non-overlapping


def test_sample_windows_too_many():
    with pytest.raises(CorpusError, match="too small"):
        W.sample_windows(torch.arange(200), 10, 11, seed=0, name="t")


def test_tokenize_is_cached_and_deterministic(tokenizer):
    c = Corpus("t", ("hello world", "the fox"))
    a = W.tokenize_corpus(c, tokenizer)
    b = W.tokenize_corpus(c, tokenizer)
    assert torch.equal(a, b)
    expected = tokenizer("hello world\n\n", add_special_tokens=False)["input_ids"]
    assert a[: len(expected)].tolist() == expected


def test_with_bos_only_when_tokenizer_adds_one(tokenizer):
    w = torch.zeros(2, 4, dtype=torch.long)
    assert W.with_bos(w, tokenizer).shape == (2, 4)  # this tokenizer adds no BOS

    class AddsBos:
        bos_token_id = 7

        def __call__(self, text):
            return {"input_ids": [7, 1]}

    out = W.with_bos(w, AddsBos())
    assert out.shape == (2, 5) and (out[:, 0] == 7).all()
