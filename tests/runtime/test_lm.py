"""RuntimeLM: the runtime's lean forward (packed kernels) scores requests as the model does."""

from __future__ import annotations

import copy

import pytest

from tests.conftest import tiny_model
from tinyllm.errors import ConfigError
from tinyllm.eval.lm import ModuleLM, encode_pair
from tinyllm.eval.tasks import run_tasks
from tinyllm.quant.api import quantize
from tinyllm.quant.rtn import RTN
from tinyllm.runtime.lm import RuntimeLM

PAIRS = [
    ("The quick brown fox", " jumps over"),
    ("Pack my box", " with five"),
    ("Pack my box", " x"),
    ("", "Sphinx of black"),
    ("A wizard's job is to vex chumps quickly in fog. Sphinx of black quartz,", " judge my vow."),
]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", [None, 4, 8])
def test_runtime_scores_requests_as_the_model(family, bits, tokenizer):
    model = tiny_model(family, vocab=len(tokenizer))
    if bits:
        quantize(model, RTN(bits=bits, group_size=32, sym=True))
    requests = [encode_pair(tokenizer, c, x) for c, x in PAIRS]
    want = ModuleLM(copy.deepcopy(model), tokenizer, fast=False).loglikelihood(requests)
    lm = RuntimeLM(model, tokenizer)
    got = lm.loglikelihood(requests)
    for (ll, greedy), (ll0, greedy0) in zip(got, want, strict=True):
        assert ll == pytest.approx(ll0, abs=2e-3)
        assert greedy == greedy0
    lm.tokens_per_batch = 16  # one sequence per forward: the same numbers
    assert [ll for ll, _ in lm.loglikelihood(requests)] == pytest.approx(
        [ll for ll, _ in got], abs=1e-4
    )


def test_runtime_runs_tasks(tokenizer):
    model = tiny_model(vocab=len(tokenizer))
    got = run_tasks(RuntimeLM(model, tokenizer), ["analogy", "analogy-gen"], limit=5)
    want = run_tasks(ModuleLM(model, tokenizer), ["analogy", "analogy-gen"], limit=5)
    assert {k: v["accuracy"] for k, v in got.items()} == {k: v["accuracy"] for k, v in want.items()}
    assert got["analogy"]["n"] == 5


def test_runtime_refuses_a_family_it_does_not_run(tokenizer):
    with pytest.raises(ConfigError, match="lean forward does not run this model"):
        RuntimeLM(tiny_model("opt", vocab=len(tokenizer)), tokenizer)
