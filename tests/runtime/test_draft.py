"""Speculative decoding with a draft model (runtime.draft): whatever the draft proposes, the
engine's output is plain decoding's; a good draft is accepted; a failing or starved draft
costs only speed."""

import copy

import pytest
import torch

from tests.conftest import tiny_model, tiny_tokenizer
from tinyllm.errors import ConfigError
from tinyllm.runtime.engine import Engine, EngineConfig
from tinyllm.runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 9, 14], [20, 21, 22, 23, 24, 25, 26], list(range(30, 70)), [7]]


def engine(model, tokenizer, draft=None, **kw) -> Engine:
    cfg = dict(kv_memory_mb=2.0, block_size=4, token_budget=64, kv_dtype="float32")
    cfg.update(kw)
    return Engine(model, tokenizer, EngineConfig(**cfg), draft=draft)


def noisy(model, scale: float, seed: int = 1):
    """A copy of `model` with Gaussian noise on every weight: a draft that mostly agrees."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_target_as_its_own_draft_is_accepted_and_changes_nothing(family, tokenizer) -> None:
    model = tiny_model(family)
    plain = engine(model, tokenizer).generate(PROMPTS, GREEDY)
    spec = engine(model, tokenizer, (copy.deepcopy(model), tokenizer), speculate=4)
    seqs = spec.generate(PROMPTS, GREEDY)
    assert [s.output for s in seqs] == [s.output for s in plain]
    m = spec.metrics
    # every draft is the target's own greedy continuation (kept in sync across verifications)
    assert m.draft_tokens > 20 and m.draft_accepted >= 0.9 * m.draft_tokens
    assert spec.cache.used_blocks == 0 and spec.drafter.cache.used_blocks == 0


def test_a_draft_that_disagrees_leaves_the_output_unchanged(tokenizer) -> None:
    """Partly right (a noisy copy) and wholly wrong (another model): rejected tokens' keys are
    dropped from both caches and the next drafts continue from the verified tokens."""
    model = tiny_model("llama")
    plain = [s.output for s in engine(model, tokenizer).generate(PROMPTS, GREEDY)]
    for draft in (noisy(model, 0.3), tiny_model("llama", seed=7)):
        spec = engine(model, tokenizer, (draft, tokenizer), speculate=3)
        assert [s.output for s in spec.generate(PROMPTS, GREEDY)] == plain
        m = spec.metrics
        assert m.draft_tokens > m.draft_accepted
        assert spec.drafter.cache.used_blocks == 0 and not spec.drafter.fed
    assert m.draft_tokens > 0  # the wrong draft was tried too, then paused


def test_sampled_requests_and_stops_with_a_draft(tokenizer) -> None:
    model = tiny_model("llama")
    stop = SamplingParams(max_tokens=5, ignore_eos=True)
    a = engine(model, tokenizer).generate(PROMPTS, stop)
    spec = engine(model, tokenizer, (noisy(model, 0.1), tokenizer), speculate=6)
    b = spec.generate(PROMPTS, stop)
    assert [(s.output, s.finish_reason) for s in a] == [(s.output, s.finish_reason) for s in b]
    sampled = SamplingParams(max_tokens=16, temperature=0.7, seed=3, ignore_eos=True)
    seqs = spec.generate(PROMPTS, sampled)
    assert [len(s.output) for s in seqs] == [16] * len(PROMPTS)
    assert spec.drafter.cache.used_blocks == 0


def test_a_starved_or_failing_draft_costs_only_the_drafts(tokenizer) -> None:
    model = tiny_model("llama")
    plain = [s.output for s in engine(model, tokenizer).generate(PROMPTS, GREEDY)]
    full = engine(model, tokenizer, (copy.deepcopy(model), tokenizer), speculate=4)
    full.generate(PROMPTS, GREEDY)
    # a draft pool of two blocks (8 tokens) holds the short prompts at most: the others
    # decode without drafts
    small = engine(model, tokenizer, (copy.deepcopy(model), tokenizer), speculate=4)
    small.drafter.cache = type(small.drafter.cache)(small.drafter.cache.shape, 2, 4)
    assert [s.output for s in small.generate(PROMPTS, GREEDY)] == plain
    assert 0 < small.metrics.draft_tokens < full.metrics.draft_tokens / 2
    broken = engine(model, tokenizer, (copy.deepcopy(model), tokenizer), speculate=4)

    def boom(*_):
        raise RuntimeError("simulated draft failure")

    broken.drafter.runtime.forward = boom
    assert [s.output for s in broken.generate(PROMPTS, GREEDY)] == plain
    assert broken.metrics.draft_tokens == 0 and broken.metrics.step_failures > 0
    assert broken.drafter.cache.used_blocks == 0


def test_a_draft_must_share_the_vocabulary_and_have_k(tokenizer) -> None:
    model = tiny_model("llama")
    other = tiny_tokenizer(320, text="a different corpus entirely, " * 40)
    with pytest.raises(ConfigError, match="tokenizer differs"):
        engine(model, tokenizer, (tiny_model("llama"), other), speculate=4)
    with pytest.raises(ConfigError, match="--speculate"):
        engine(model, tokenizer, (tiny_model("llama"), tokenizer))
    with pytest.raises(ConfigError, match="lean runtime"):
        engine(model, tokenizer, (tiny_model("opt"), tokenizer), speculate=4)


def test_the_drafts_pool_holds_the_models_tokens_at_the_drafts_bytes(tokenizer) -> None:
    """A layer-dropped draft gets as many KV blocks as the model's pool (so it never runs out
    first) and, with half the layers, half the bytes: --kv-memory is not spent twice."""
    from tinyllm.models.surgery import keep_blocks

    model = tiny_model("llama")
    draft = copy.deepcopy(model)
    keep_blocks(draft, [0])
    spec = engine(model, tokenizer, (draft, tokenizer), speculate=4)
    assert spec.drafter.cache.num_blocks == spec.cache.num_blocks
    assert spec.drafter.cache.pool_bytes() * 2 == spec.cache.pool_bytes()


def test_proposals_after_plain_steps_equal_a_fresh_drafts() -> None:
    """The target rejected a whole draft and then decoded plainly a few steps (drafting
    paused): the draft's stale keys, mid-sequence now, are dropped before it proposes again."""
    from tinyllm.runtime.draft import DraftModel

    model = tiny_model("llama")

    def drafter() -> DraftModel:
        return DraftModel(model, 320, torch.float32, 64, 4, torch.device("cpu"))

    d, ids = drafter(), list(range(30, 50))
    first = d.propose({0: (ids, 4)})[0]
    assert len(first) == 4 and d.cache.used_blocks == 6  # 20 + 3 fed draft tokens
    other = [(t + 1) % 320 for t in first]
    moved = ids + other  # not one draft token kept
    assert d.propose({0: (moved, 4)}) == drafter().propose({0: (moved, 4)})
    d.release(0)
    assert d.cache.used_blocks == 0 and not d.fed
