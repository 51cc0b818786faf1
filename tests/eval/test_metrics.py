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
