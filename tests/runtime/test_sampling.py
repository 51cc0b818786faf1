import pytest
import torch
from pydantic import ValidationError

from tinyllm.runtime.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k_top_p,
    make_generator,
    sample,
)


def test_greedy_takes_argmax_and_penalty_can_change_it() -> None:
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    assert sample(logits, SamplingParams(), torch.empty(0, dtype=torch.long), None) == 1
    penalised = SamplingParams(repetition_penalty=1.5)
    assert sample(logits, penalised, torch.tensor([1]), None) == 2
    out = apply_repetition_penalty(logits, torch.tensor([1, 3]), 2.0)
    expected = torch.tensor([1.0, 1.5, 2.9, -2.0])  # positive divided, negative multiplied
    assert torch.equal(out, expected)


def test_top_k_and_top_p_keep_the_right_sets() -> None:
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = torch.isfinite(filter_top_k_top_p(logits, 2, 1.0))
    assert kept.tolist() == [True, True, False, False, False]
    kept = torch.isfinite(filter_top_k_top_p(logits, 0, 0.8))  # 0.5+0.2 < 0.8 <= 0.85
    assert kept.tolist() == [True, True, True, False, False]
    kept = torch.isfinite(filter_top_k_top_p(logits, 0, 0.1))  # the top token always stays
    assert kept.tolist() == [True, False, False, False, False]


def test_seeded_sampling_repeats_and_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    params = SamplingParams(temperature=1.0, seed=7)
    seen = torch.empty(0, dtype=torch.long)
    gen = make_generator(params)
    draws = [sample(probs.log(), params, seen, gen) for _ in range(3000)]
    gen2 = make_generator(params)
    assert draws[:50] == [sample(probs.log(), params, seen, gen2) for _ in range(50)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)


def test_bad_parameters_are_refused() -> None:
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"top_k": -2}):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
