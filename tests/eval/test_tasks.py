"""The task harness: request encoding, log-likelihoods, generation, accuracy and its error."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import FAMILIES, tiny_model
from tinyllm.data.tasks import Doc, Task
from tinyllm.eval.lm import LogitsLM, ModuleLM, encode, encode_pair
from tinyllm.eval.tasks import cut_at_stop, mean_stderr, run_task


@pytest.fixture
def lm(tokenizer) -> ModuleLM:
    return ModuleLM(tiny_model("llama", vocab=len(tokenizer)), tokenizer, "tiny", fast=False)


class Plain(LogitsLM):
    """The generic path: one unpadded forward per sequence, nothing shared."""

    def __init__(self, inner: ModuleLM) -> None:
        super().__init__("plain", inner.tokenizer)
        self.model = inner.model

    def tail_logits(self, seqs, starts):
        with torch.inference_mode():
            return [
                self.model(torch.tensor([s])).logits[0, st:]
                for s, st in zip(seqs, starts, strict=True)
            ]


def test_encode_pair_splits_the_whole_string_and_moves_trailing_spaces(tokenizer):
    ctx, cont = encode_pair(tokenizer, "The quick brown ", "fox jumps")
    assert ctx + cont == encode(tokenizer, "The quick brown fox jumps")  # no BOS by default here
    assert ctx == encode(tokenizer, "The quick brown")  # the space went to the continuation
    assert encode_pair(tokenizer, "", "fox")[0] == [tokenizer.eos_token_id]  # never empty


def test_loglikelihood_is_the_sum_of_next_token_log_probabilities(lm):
    ctx, cont = [0, 5, 9, 12], [40, 41, 42]
    with torch.inference_mode():
        logp = torch.log_softmax(lm.model(torch.tensor([ctx + cont])).logits[0], -1)
    want = sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
    greedy = all(int(logp[len(ctx) - 1 + k].argmax()) == t for k, t in enumerate(cont))
    ((got, is_greedy),) = lm.loglikelihood([(ctx, cont)])
    assert got == pytest.approx(want, abs=1e-4) and is_greedy == greedy


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_shared_and_plain_paths_agree(family, tokenizer):
    lm = ModuleLM(tiny_model(family, vocab=len(tokenizer)), tokenizer, family, fast=False)
    torch.manual_seed(1)
    reqs = [
        ([0, *torch.randint(2, 300, (n,)).tolist()], torch.randint(2, 300, (k,)).tolist())
        for n, k in [(3, 1), (9, 2), (5, 4), (12, 1)]
    ]
    reqs += [(reqs[0][0], [7]), (reqs[0][0], [8])]  # one-token choices of one context share a row
    batched = lm.loglikelihood(reqs)
    plain = Plain(lm).loglikelihood(reqs)
    alone = [lm.loglikelihood([r])[0] for r in reqs]
    for (a, ga), (b, gb), (c, gc) in zip(batched, plain, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and a == pytest.approx(c, abs=1e-4)
        assert ga == gb == gc


def test_cached_batched_generation_matches_the_generic_greedy_loop(lm):
    reqs = [([0, 5, 9, 12], 5), ([0, 40, 41], 3), ([0, 7, 7, 7, 7, 7, 9], 6)]
    assert lm.generate(reqs) == Plain(lm).generate(reqs)


class Oracle:
    """Scores the choice named in its table highest; generates a fixed text."""

    name = "oracle"

    def __init__(self, tokenizer, best: dict[str, str], text: str = "") -> None:
        self.tokenizer, self.best, self.text = tokenizer, best, text

    def loglikelihood(self, requests):
        out = []
        for ctx, cont in requests:
            full = self.tokenizer.decode(ctx + cont, skip_special_tokens=True)
            hit = any(full.endswith(f"{c} {b}") for c, b in self.best.items())
            out.append((0.0 if hit else -float(len(cont)), hit))
        return out

    def generate(self, requests):
        return [encode(self.tokenizer, self.text) for _ in requests]


def test_accuracy_and_standard_error_follow_the_scores(tokenizer):
    docs = [Doc(f"q{i}", ("yes", "no"), gold=i % 2) for i in range(4)]
    picks = {"q0": "yes", "q1": "no", "q2": "yes", "q3": "yes"}  # 3 of 4 right
    result = run_task(Oracle(tokenizer, picks), Task("t", "choice", docs))
    assert result["accuracy"] == 0.75 and result["n"] == 4
    assert result["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 * 4 / 3 / 4))
    assert mean_stderr([1.0]) == 0.0


def test_acc_norm_divides_by_the_choice_length(tokenizer):
    class Long:
        name, tokenizer = "long", None

        def loglikelihood(self, requests):  # every character costs 1 nat, plus 5 per choice
            return [(-5.0 - len(self.tokenizer.decode(cont)), False) for _, cont in requests]

    lm = Long()
    lm.tokenizer = tokenizer
    docs = [Doc("The quick", ("fox", "brown dog jumps"), gold=1)]
    result = run_task(lm, Task("t", "choice", docs, metric="acc_norm"))
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0 and result["accuracy"] == 1.0


def test_generation_is_cut_at_stop_strings_and_matched_exactly(tokenizer):
    docs = [Doc("Athens is to Greece as Baghdad is to", answer="Iraq")]
    task = Task("g", "generate", docs, stop=("\n", "."))
    assert run_task(Oracle(tokenizer, {}, " Iraq. Then"), task)["accuracy"] == 1.0
    assert run_task(Oracle(tokenizer, {}, " Iraqi."), task)["accuracy"] == 0.0
    assert cut_at_stop(" a, b.\nc", (".", ",")) == "a"


def test_real_tasks_run_on_a_tiny_model(lm):
    from tinyllm.eval.tasks import run_tasks

    scores = run_tasks(lm, ["analogy", "polarity", "analogy-gen"], limit=6)
    assert set(scores) == {"analogy", "polarity", "analogy-gen"}
    for s in scores.values():
        assert s["n"] == 6 and 0.0 <= s["accuracy"] <= 1.0


def test_a_packed_head_without_a_weight_is_scored(tokenizer):
    from torch import nn

    class Packed(nn.Module):  # like QuantLinear after `embeddings --bits 8`: no .weight
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.inner, self.out_features = linear, linear.out_features

        def forward(self, x):
            return self.inner(x)

    model = tiny_model("llama", vocab=len(tokenizer))
    plain = ModuleLM(model, tokenizer, fast=False).loglikelihood([([0, 5, 9], [7, 8])])
    model.lm_head = Packed(model.lm_head)
    model.config.tie_word_embeddings = False
    assert ModuleLM(model, tokenizer, fast=False).loglikelihood([([0, 5, 9], [7, 8])]) == plain
