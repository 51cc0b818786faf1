import math

import torch
import torch.nn.functional as F

from tinyllm.eval.divergence import token_kl, top1_agree
from tinyllm.eval.perplexity import perplexity, token_nll


def test_token_nll_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    ref = F.cross_entropy(logits.view(10, 11), targets.view(10), reduction="none").view(2, 5)
    torch.testing.assert_close(token_nll(logits, targets), ref, rtol=1e-5, atol=1e-6)


def test_perplexity_of_uniform_model_is_vocab_size():
    logits = torch.zeros(1, 4, 7)
    nll = token_nll(logits, torch.zeros(1, 4, dtype=torch.long))
    assert math.isclose(perplexity(float(nll.sum()), 4), 7.0, rel_tol=1e-6)


def test_kl_by_hand():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    by_hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))
    kl = token_kl(p.log().view(1, 1, 3), q.log().view(1, 1, 3))
    assert math.isclose(float(kl), by_hand, rel_tol=1e-5)


def test_kl_of_identical_is_zero_and_shift_invariant():
    logits = torch.randn(2, 3, 9)
    assert float(token_kl(logits, logits + 3.0).abs().max()) < 1e-5


def test_top1_and_padded_vocab():
    ref = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]])
    model = torch.tensor([[[0.0, 2.0, 1.0, 9.0], [0.0, 1.0, 0.0, 9.0]]])  # padded column dropped
    assert top1_agree(ref, model).tolist() == [[True, False]]


def test_kl_in_chunks_equals_the_whole_expression(monkeypatch):
    """token_kl and token_nll walk the positions CHUNK at a time (bounded temporaries on a
    128k vocabulary); each position gets exactly the one-shot expression's value."""
    from tinyllm.eval import divergence

    g = torch.Generator().manual_seed(3)
    ref, logits = torch.randn(3, 70, 50, generator=g), torch.randn(3, 70, 50, generator=g)
    ref_lp, lp = torch.log_softmax(ref, -1), torch.log_softmax(logits, -1)
    whole = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0.0)
    monkeypatch.setattr(divergence, "CHUNK", 32)  # 70 positions: 3 chunks, the last short
    assert torch.equal(token_kl(ref, logits), whole)
    assert token_kl(ref[:, :0], logits[:, :0]).shape == (3, 0)
    targets = torch.randint(0, 50, (3, 70), generator=g)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(token_nll(logits, targets), torch.logsumexp(logits, -1) - picked)
    assert torch.equal(token_kl(ref[1], logits[1]), whole[1])  # one window: [T, V]
    assert torch.equal(token_nll(logits[1], targets[1]), token_nll(logits, targets)[1])


def test_evaluation_batches_bound_the_logits():
    """Windows per forward: TOKENS_PER_BATCH tokens, fewer when the vocabulary is large."""
    from types import SimpleNamespace

    from tinyllm.eval.evaluate import _batch_size

    def model(vocab):
        return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))

    assert _batch_size(model(49152), 513) == 3  # SmolLM2: 2048 tokens
    assert _batch_size(model(128256), 257) == 4  # Llama 3: 1046 tokens of 512 MiB
    assert _batch_size(model(262144), 513) == 1  # Gemma 3
