import pytest
import torch
from pydantic import ValidationError

from tinyllm.runtime.sampling import (
    NonFiniteLogits,
    SamplingParams,
    apply_logit_bias,
    apply_repetition_penalty,
    filter_top_k_top_p,
    make_generator,
    sample,
    sample_token,
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
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"top_k": -2},
                {"repetition_penalty": 1e-300}, {"temperature": float("nan")}, {"seed": 2**64},
                {"seed": -1}, {"top_p": float("inf")}, {"stop": ["x"] * 17}, {"stop": ["y" * 257]},
                {"logit_bias": {5: 100.5}}, {"logit_bias": {-1: 1.0}}, {"max_tokens": 2_000_000},
                {"logit_bias": {i: 1.0 for i in range(301)}}):  # fmt: skip
        with pytest.raises(ValidationError):
            SamplingParams(**bad)


NONE = torch.empty(0, dtype=torch.long)


def test_temperatures_below_the_floor_are_greedy_and_never_nan() -> None:
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    for t in (1e-45, 5e-324, 1e-6, -0.0):
        params = SamplingParams(temperature=t)
        assert params.greedy and make_generator(params) is None
        assert sample_token(logits, params, NONE, None) == (1, False)
    floor = SamplingParams(temperature=1e-5, seed=0)  # the floor itself samples, finitely
    assert sample_token(logits * 1e3, floor, NONE, make_generator(floor)) == (1, False)


def test_non_finite_probabilities_fall_back_to_argmax() -> None:
    logits = torch.tensor([3e38, 1e38, -3e38, 0.0])  # / 1e-5 overflows: softmax gives NaN
    params = SamplingParams(temperature=1e-5, seed=0)
    assert sample_token(logits, params, NONE, make_generator(params)) == (0, True)
    penalised = SamplingParams(temperature=0.5, repetition_penalty=0.01, seed=0)
    token, fell_back = sample_token(torch.tensor([3e37, 1.0, 2.0]), penalised,
                                    torch.tensor([0]), make_generator(penalised))  # fmt: skip
    assert token == 0 and fell_back  # 3e37 / 0.01 / 0.5 overflows to inf


def test_nan_or_inf_model_logits_raise() -> None:
    for bad in (float("nan"), float("inf")):
        logits = torch.tensor([1.0, bad, 0.0])
        for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=1)):
            with pytest.raises(NonFiniteLogits):
                sample(logits, params, NONE, make_generator(params))
    masked = torch.tensor([float("-inf"), 1.0, 0.0])  # -inf is a masked token, not a fault
    assert sample(masked, SamplingParams(), NONE, None) == 1


def test_logit_bias_adds_to_the_logits_and_steers_both_modes() -> None:
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    assert torch.equal(apply_logit_bias(logits, {3: 10.0, 1: -1.0}),
                       torch.tensor([1.0, 2.0, 2.9, 9.0]))  # fmt: skip
    assert sample(logits, SamplingParams(logit_bias={3: 100}), NONE, None) == 3
    hot = SamplingParams(temperature=2.0, seed=1, logit_bias={0: 100, 1: -100})
    gen = make_generator(hot)
    assert {sample(logits, hot, NONE, gen) for _ in range(50)} == {0}
    banned = SamplingParams(temperature=1.0, seed=1, logit_bias={1: -100, 2: -100})
    gen = make_generator(banned)
    assert not {sample(logits, banned, NONE, gen) for _ in range(200)} & {1, 2}
