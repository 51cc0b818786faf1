import pytest
import torch

from tests.conftest import tiny_model
from tinyllm.errors import ConfigError
from tinyllm.runtime.engine import INTERNAL_ERROR, Engine, EngineConfig, EngineLoop
from tinyllm.runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 9, 14], [20, 21, 22, 23, 24, 25, 26], list(range(30, 70)), [7]]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


def engine(model, tokenizer, **kw) -> Engine:
    cfg = dict(kv_memory_mb=2.0, block_size=4, token_budget=64, kv_dtype="float32")
    cfg.update(kw)
    return Engine(model, tokenizer, EngineConfig(**cfg))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_batched_greedy_matches_transformers_generate(family, tokenizer) -> None:
    model = tiny_model(family)
    seqs = engine(model, tokenizer).generate(PROMPTS, GREEDY)
    for p, s in zip(PROMPTS, seqs, strict=True):
        assert s.output == hf_greedy(model, p, 12), p
        assert s.finish_reason == "length"


def test_float16_kv_cache_halves_memory_and_keeps_the_tokens(tokenizer) -> None:
    model = tiny_model("llama")
    exact = engine(model, tokenizer)
    half = engine(model, tokenizer, kv_dtype="float16")
    assert 2 * half.cache.shape.bytes_per_token() == exact.cache.shape.bytes_per_token()
    assert half.cache.num_blocks == 2 * exact.cache.num_blocks  # same MiB, twice the tokens
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    a, b = exact.generate(PROMPTS, params), half.generate(PROMPTS, params)
    assert [s.output for s in a] == [s.output for s in b]
    with pytest.raises(ConfigError, match="KV cache dtype"):
        engine(model, tokenizer, kv_dtype="int3")


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ],
)  # fmt: skip
def test_rope_scaling_variants_match_generate(rope, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    cfg = tiny_config("llama")
    cfg.rope_parameters = {**rope, "rope_theta": 10000.0}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    seqs = engine(model, tokenizer).generate(PROMPTS, GREEDY)
    assert [s.output for s in seqs] == [hf_greedy(model, p, 12) for p in PROMPTS]


def test_a_failing_step_ends_its_sequences_with_an_error_and_frees_blocks(tokenizer) -> None:
    eng = engine(tiny_model("llama"), tokenizer)
    events = []
    seqs = [eng.submit(p, GREEDY, sink=events.append) for p in PROMPTS]
    eng.step()
    assert eng.cache.used_blocks > 0

    def boom(*_):
        raise RuntimeError("simulated kernel failure")

    eng.runtime.forward = boom
    eng.step()
    assert all(s.finish_reason == "error" for s in seqs)
    assert eng.cache.used_blocks == 0 and not eng.running
    errors = {e.error for e in events if e.finish_reason}
    assert errors == {INTERNAL_ERROR}  # the exception's text stays in the log
    assert eng.metrics.step_failures == 1


def test_chunked_prefill_preemption_and_joining_late_change_nothing(tokenizer) -> None:
    model = tiny_model("llama")
    ref = engine(model, tokenizer).generate(PROMPTS, GREEDY)
    # a budget of 5 tokens per step splits the 40-token prompt into chunks; a pool of 6 blocks
    # of 4 tokens cannot hold all four sequences, so some are preempted and recomputed
    per_block = engine(model, tokenizer).cache.shape.bytes_per_token() * 4
    tight = engine(model, tokenizer, token_budget=5, kv_memory_mb=14 * per_block / 2**20)
    assert tight.cache.num_blocks == 14
    seqs = tight.generate(PROMPTS, GREEDY)
    assert [s.output for s in seqs] == [s.output for s in ref]
    assert tight.metrics.preemptions > 0
    assert tight.cache.used_blocks == 0
    # a request that joins while others decode gets the same tokens as alone
    eng = engine(model, tokenizer)
    first = eng.submit(PROMPTS[2], GREEDY)
    for _ in range(4):
        eng.step()
    late = eng.submit(PROMPTS[0], GREEDY)
    while first.finish_reason is None or late.finish_reason is None:
        eng.step()
    assert first.output == ref[2].output and late.output == ref[0].output


def test_shared_prefix_is_reused_and_gives_the_same_tokens(tokenizer) -> None:
    model = tiny_model("llama")
    eng = engine(model, tokenizer)
    base = list(range(40, 61))  # 21 tokens: five full blocks
    a = eng.submit(base, GREEDY)
    eng.step()  # a's prompt is in the cache
    b = eng.submit([*base[:20], 99], GREEDY)
    while a.finish_reason is None or b.finish_reason is None:
        eng.step()
    assert eng.metrics.prefix_tokens_reused == 20
    assert b.output == hf_greedy(model, [*base[:20], 99], 12)
    assert eng.cache.used_blocks == 0


def test_streamed_text_is_the_final_text_and_stop_strings_cut(tokenizer) -> None:
    model = tiny_model("llama")
    eng = engine(model, tokenizer)
    events = []
    seq = eng.submit(tokenizer.encode("The quick"), GREEDY, sink=events.append)
    while seq.finish_reason is None:
        eng.step()
    full = tokenizer.decode(seq.output, skip_special_tokens=True)
    assert "".join(e.text for e in events) == full == seq.text
    assert events[-1].finish_reason == "length"
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    events.clear()
    seq2 = eng.submit(tokenizer.encode("The quick"), GREEDY.model_copy(update={"stop": [stop]}),
                      sink=events.append)  # fmt: skip
    while seq2.finish_reason is None:
        eng.step()
    assert seq2.finish_reason == "stop"
    assert "".join(e.text for e in events) == full[: full.find(stop)]


def test_cancel_frees_blocks_and_no_block_leaks_after_many_requests(tokenizer) -> None:
    model = tiny_model("llama")
    eng = engine(model, tokenizer, kv_memory_mb=1.0)
    gen = torch.Generator().manual_seed(0)
    cancelled = done = 0
    live = []
    for i in range(300):
        n = int(torch.randint(1, 30, (1,), generator=gen))
        params = SamplingParams(max_tokens=int(torch.randint(1, 20, (1,), generator=gen)),
                                ignore_eos=True, temperature=0.8, seed=i)  # fmt: skip
        live.append(eng.submit(torch.randint(2, 300, (n,), generator=gen).tolist(), params))
        if i % 5 == 4:  # every fifth request goes away mid-stream
            eng.step()
            eng.cancel(live[-1].id)
        if len(live) >= 24:
            while eng.has_work():
                eng.step()
            cancelled += sum(s.finish_reason == "cancelled" for s in live)
            done += sum(s.finish_reason == "length" for s in live)
            live = []
    while eng.has_work():
        eng.step()
    cancelled += sum(s.finish_reason == "cancelled" for s in live)
    done += sum(s.finish_reason == "length" for s in live)
    assert cancelled + done == 300 and cancelled >= 48
    assert eng.cache.used_blocks == 0 and not eng.cache.seqs and not eng.cache.by_hash


def test_quantized_and_head_pruned_models_run_and_match_generate(tokenizer) -> None:
    import tinyllm
    from tinyllm.prune.structured import Heads

    model = tiny_model("llama")
    tinyllm.quantize(model, tinyllm.RTN(bits=4, group_size=32))
    seqs = engine(model, tokenizer).generate(PROMPTS[:2], GREEDY)
    assert [s.output for s in seqs] == [hf_greedy(model, p, 12) for p in PROMPTS[:2]]

    pruned = tiny_model("llama")
    calib = torch.randint(2, 300, (2, 16))
    tinyllm.prune(pruned, Heads(count=1), calib=calib)  # 2 KV groups -> 1
    eng = engine(pruned, tokenizer)
    assert eng.cache.shape.kv_heads == (1, 1)
    seqs = eng.generate(PROMPTS[:2], GREEDY)
    assert [s.output for s in seqs] == [hf_greedy(pruned, p, 12) for p in PROMPTS[:2]]


def test_int8_activation_mode_runs_the_integer_kernel_and_mostly_agrees(tokenizer) -> None:
    import tinyllm
    from tinyllm.kernels import native

    if native.q4_kernel() is None or not native.q4_kernel().q4_i8_supported():
        pytest.skip("needs tinyllm's native kernels with AVX512-VNNI")
    model = tiny_model("llama")
    tinyllm.quantize(model, tinyllm.RTN(bits=4, group_size=32))
    exact = engine(model, tokenizer).generate(PROMPTS, GREEDY)
    fast = engine(model, tokenizer, int8_activations=True)
    assert all(ly.qkv.i8 and ly.down.i8 for ly in fast.runtime.layers)
    seqs = fast.generate(PROMPTS, GREEDY)
    first = [s.output[:3] for s in seqs]
    assert first == [s.output[:3] for s in exact]  # rounding moves logits by ~0.5%


def _gemma3(window: int = 6):
    """A three-block Gemma 3 with both layer types, a window the prompts and outputs exceed,
    and its own RoPE base per layer type."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    cfg = tiny_config("gemma3")
    cfg.num_hidden_layers = 3
    cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    cfg.sliding_window = window
    cfg.initializer_range = 0.1  # sharper attention: the window and the RoPE bases matter
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("budget", [64, 8])
def test_gemma3_runs_in_the_lean_forward_with_greedy_parity(budget: int, tokenizer) -> None:
    """Gemma 3 (q/k norms, four norms per block scaling by 1 + w, GELU, sliding and global
    layers with their own RoPE bases, embedding scaling) through the lean forward: the greedy
    tokens of transformers' generate, chunked prefill included."""
    model = _gemma3()
    eng = engine(model, tokenizer, token_budget=budget)
    assert eng.fallback is None
    assert [ly.window for ly in eng.runtime.layers] == [6, None, 6]
    seqs = eng.generate(PROMPTS, GREEDY)
    assert [s.output for s in seqs] == [hf_greedy(model, p, 12) for p in PROMPTS]
    assert eng.cache.used_blocks == 0


def test_gemma3_window_changes_the_tokens(tokenizer) -> None:
    """The check above can fail: another window gives other tokens on these prompts."""
    a = engine(_gemma3(6), tokenizer).generate(PROMPTS, GREEDY)
    b = engine(_gemma3(1000), tokenizer).generate(PROMPTS, GREEDY)
    assert [s.output for s in a] != [s.output for s in b]


def test_other_families_fall_back_to_transformers_with_the_same_tokens(tokenizer) -> None:
    model = tiny_model("phi3")  # not in the lean forward's table
    eng = engine(model, tokenizer, token_budget=8)  # chunked prefill through the fallback too
    assert eng.fallback and "phi3" in eng.fallback
    seqs = eng.generate(PROMPTS, GREEDY)
    assert [s.output for s in seqs] == [hf_greedy(model, p, 12) for p in PROMPTS]
    assert eng.cache.used_blocks == 0 and not eng.runtime.caches


def test_requests_that_cannot_run_are_refused(tokenizer) -> None:
    eng = engine(tiny_model("llama"), tokenizer)
    with pytest.raises(ConfigError, match="empty"):
        eng.submit([], GREEDY)
    with pytest.raises(ConfigError, match="exceeds the context"):
        eng.submit([3] * 250, SamplingParams(max_tokens=10))  # max_position_embeddings 256


def test_the_longest_request_the_pool_allows_still_runs(tokenizer) -> None:
    per_block = engine(tiny_model("llama"), tokenizer).cache.shape.bytes_per_token() * 4
    eng = engine(tiny_model("llama"), tokenizer, kv_memory_mb=6 * per_block / 2**20)
    assert eng.max_context == 5 * 4  # one block kept free for admission
    seq = eng.generate([list(range(2, 18))], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(seq.output) == 4 and eng.cache.used_blocks == 0
    with pytest.raises(ConfigError, match="exceeds the context"):
        eng.submit(list(range(2, 18)), SamplingParams(max_tokens=5))


@pytest.mark.parametrize("method", ["int8-dynamic", "smoothquant"])
def test_w8a8_models_run_in_the_engine_and_match_generate(method, tokenizer) -> None:
    import tinyllm
    from tinyllm.kernels.qlinear import ActQuantLinear

    model = tiny_model("llama")
    calib = torch.randint(2, 300, (16, 64), generator=torch.Generator().manual_seed(0))
    cfg = tinyllm.Int8Dynamic() if method == "int8-dynamic" else tinyllm.SmoothQuant()
    tinyllm.quantize(model, cfg, calib=calib)
    assert isinstance(model.model.layers[0].mlp.down_proj, ActQuantLinear)
    seqs = engine(model, tokenizer).generate(PROMPTS[:2], GREEDY)
    assert [s.output for s in seqs] == [hf_greedy(model, p, 12) for p in PROMPTS[:2]]


def run_all(eng: Engine) -> None:
    while eng.has_work():
        eng.step()


def test_nan_logits_end_only_their_sequence(tokenizer) -> None:
    eng = engine(tiny_model("llama"), tokenizer)
    forward = eng.runtime.forward
    sampled = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=1)
    seqs = [eng.submit(p, params) for p, params in zip(PROMPTS, [GREEDY, sampled] * 2,
                                                       strict=True)]  # fmt: skip
    victims = {seqs[0].id, seqs[1].id}  # one greedy, one sampled

    def poisoned(batch, cache):
        logits = forward(batch, cache).clone()  # [rows, vocab], a row per sequence to sample
        ready = [sid for sid, span in batch.spans if span.stop - 1 in batch.logit_rows.tolist()]
        for row, sid in enumerate(ready):
            if sid in victims:
                logits[row] = float("nan")
        return logits

    eng.runtime.forward = poisoned
    run_all(eng)
    assert [s.finish_reason for s in seqs] == ["error", "error", "length", "length"]
    assert eng.metrics.nonfinite_logits == 2 and eng.cache.used_blocks == 0


def test_a_detokenizer_failure_ends_only_its_sequence(tokenizer) -> None:
    eng = engine(tiny_model("llama"), tokenizer)
    seqs = [eng.submit(p, GREEDY) for p in PROMPTS]
    stream = eng._stream

    def flaky(seq, token):
        if seq is seqs[2] and len(seq.output) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")
        return stream(seq, token)

    eng._stream = flaky
    run_all(eng)
    assert [s.finish_reason for s in seqs] == ["length", "length", "error", "length"]
    assert eng.cache.used_blocks == 0 and not eng.running


def test_a_step_that_fails_outside_the_forward_frees_everything_and_the_next_runs(
    tokenizer,
) -> None:
    eng = engine(tiny_model("llama"), tokenizer)
    seqs = [eng.submit(p, GREEDY) for p in PROMPTS]
    eng.step()
    plan = eng._plan
    eng._plan = lambda: 1 / 0
    assert eng.step() == 0
    assert all(s.finish_reason == "error" for s in seqs) and eng.cache.used_blocks == 0
    eng._plan = plan
    (after,) = eng.generate([PROMPTS[0]], GREEDY)
    assert after.finish_reason == "length" and eng.cache.used_blocks == 0


def test_the_loop_survives_a_raising_step_and_reports_a_stall(tokenizer) -> None:
    eng = engine(tiny_model("llama"), tokenizer)
    loop = EngineLoop(eng, stall_seconds=0.2)
    calls = []

    def step() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated")
        return Engine.step(eng)

    eng.step = step
    seq = eng.submit(PROMPTS[0], GREEDY)
    loop.run_until(lambda: seq.finish_reason is not None)
    assert seq.finish_reason == "length" and eng.metrics.step_failures == 1
    assert loop.problem() is None
    loop.beat -= 1.0  # as if a step had hung for a second
    assert "no progress" in loop.problem()


def test_int8_kv_cache_halves_float16_bytes_and_keeps_the_tokens(tokenizer) -> None:
    """--kv-dtype int8: a code per element plus a float32 scale per token and head, (hd + 4) /
    (2 hd) of float16's bytes; greedy tokens as with float16 on the tiny model; the fused decode
    attention reads the codes and scales exactly as the PyTorch path dequantizes them."""
    model = tiny_model("llama")
    half = engine(model, tokenizer, kv_dtype="float16")
    quart = engine(model, tokenizer, kv_dtype="int8")
    hd = quart.cache.shape.head_dim
    ratio = quart.cache.shape.bytes_per_token() / half.cache.shape.bytes_per_token()
    assert ratio == (hd + 4) / (2 * hd)
    assert quart.cache.pool_bytes() <= 2 * 2**20
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    a, b = half.generate(PROMPTS, params), quart.generate(PROMPTS, params)
    assert [s.output for s in a] == [s.output for s in b]


def test_fused_int8_decode_attention_equals_the_dequantized_reference() -> None:
    from tinyllm.kernels import native
    from tinyllm.runtime.kv_cache import CacheShape, PagedKVCache

    ops = native.q4_kernel()
    if ops is None:
        pytest.skip("tinyllm's C++ kernels are not built here")
    torch.manual_seed(0)
    cache = PagedKVCache(CacheShape(1, (2,), 64, torch.int8), num_blocks=8, block_size=4)
    for seq, n in ((0, 13), (1, 6)):
        cache.add(seq)
        slots = cache.reserve(seq, n)
        cache.write(0, slots, torch.randn(n, 2, 64), torch.randn(n, 2, 64))
    lengths = torch.tensor([13, 6])
    ctx = torch.zeros(2, 13, dtype=torch.long)
    for seq in (0, 1):
        ctx[seq, : lengths[seq]] = cache.slots(seq)
    q = torch.randn(2, 4, 64)  # 4 query heads over 2 KV heads
    got = ops.paged_decode_attention(
        q, cache.k[0], cache.v[0], ctx, lengths, torch.zeros(2, dtype=torch.long), 0.125,
        cache.k_scale[0], cache.v_scale[0],
    )  # fmt: skip
    for seq in (0, 1):
        k, v = cache.read(0, ctx[seq, : lengths[seq]])  # [L, 2, 64]
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        w = torch.softmax(torch.einsum("hd,lhd->hl", q[seq], k) * 0.125, -1)
        torch.testing.assert_close(got[seq], torch.einsum("hl,lhd->hd", w, v), rtol=1e-4, atol=1e-5)


def test_lookup_draft_proposes_what_followed_the_latest_match() -> None:
    from tinyllm.runtime.engine import lookup_draft

    ids = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup_draft(ids, 2) == [7, 8]  # the latest earlier "1 2 3"
    assert lookup_draft([4, 5, 6, 5], 3, min_n=1) == [6, 5]  # "5" once before: what followed
    assert lookup_draft([4, 5, 6, 5], 3) == []  # one token alone is not matched by default
    assert lookup_draft([1, 2, 3], 4) == []  # no earlier occurrence of anything
    assert lookup_draft([7], 2) == []


REPEATS = [[5, 9, 14, 5, 9, 14, 5, 9], list(range(30, 50)) * 3, [7, 7, 7, 7], [20, 21, 22]]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_speculative_greedy_output_is_plain_greedy(family: str, tokenizer) -> None:
    """Prompt-lookup drafts verified in one forward: the tokens of plain greedy decoding, with
    drafts accepted (repetitive prompts) and rejected; no KV block left behind."""
    model = tiny_model(family)
    plain = engine(model, tokenizer).generate(REPEATS, GREEDY)
    spec = engine(model, tokenizer, speculate=4)
    seqs = spec.generate(REPEATS, GREEDY)
    assert [s.output for s in seqs] == [s.output for s in plain]
    assert spec.metrics.draft_tokens > spec.metrics.draft_accepted > 0
    assert spec.cache.used_blocks == 0


def test_speculation_keeps_stops_limits_and_sampled_sequences(tokenizer) -> None:
    """An EOS or max_tokens inside an accepted draft ends the sequence there; greedy with a
    repetition penalty stays token for token; sampled sequences speculate too."""
    from tinyllm.runtime.sampling import SamplingParams

    model = tiny_model("llama")
    for params in (SamplingParams(max_tokens=5, ignore_eos=True), SamplingParams(max_tokens=12)):
        a = engine(model, tokenizer).generate(REPEATS, params)
        b = engine(model, tokenizer, speculate=6).generate(REPEATS, params)
        assert [(s.output, s.finish_reason) for s in a] == [(s.output, s.finish_reason) for s in b]
    penalised = SamplingParams(max_tokens=10, repetition_penalty=1.3, ignore_eos=True)
    a = engine(model, tokenizer).generate(REPEATS, penalised)
    spec = engine(model, tokenizer, speculate=4)
    b = spec.generate(REPEATS, penalised)  # greedy on penalised logits: still token for token
    assert [s.output for s in a] == [s.output for s in b]
    sampled = SamplingParams(max_tokens=16, temperature=0.05, seed=3, ignore_eos=True)  # repeats
    spec = engine(model, tokenizer, speculate=4)
    seqs = spec.generate(REPEATS, sampled)
    assert [len(s.output) for s in seqs] == [16] * len(REPEATS)
    assert spec.metrics.draft_tokens > 0 and spec.cache.used_blocks == 0


def test_truncate_gives_back_the_blocks_past_the_kept_tokens() -> None:
    from tinyllm.runtime.kv_cache import CacheShape, PagedKVCache

    cache = PagedKVCache(CacheShape(1, (1,), 4, torch.float32), 8, block_size=4)
    cache.add(0)
    cache.reserve(0, 10)  # 3 blocks
    assert cache.used_blocks == 3
    cache.truncate(0, 5)
    assert cache.used_blocks == 2 and len(cache.slots(0)) == 5
    again = cache.reserve(0, 3)  # positions 5..7: the same block, then no new one
    assert cache.used_blocks == 2 and again.tolist() == cache.slots(0)[5:].tolist()
    with pytest.raises(ValueError):
        cache.truncate(0, 9)


def test_verified_drafts_are_distributed_as_sampling_one_token_at_a_time() -> None:
    """Speculative sampling with a prompt-lookup draft: the first token, and the second given
    the first, follow the target distributions (20,000 draws; chi-square, 1e-4 level), for a
    draft token the target likes and one it does not."""
    from tinyllm.runtime.sampling import SamplingParams, verify_draft

    def chi2(observed: torch.Tensor, probs: torch.Tensor) -> float:
        expected = probs * observed.sum()
        return float(((observed - expected) ** 2 / expected).sum())

    critical = 21.11  # the chi-square distribution's 1 - 1e-4 quantile at 3 degrees of freedom

    params = SamplingParams(temperature=1.0, max_tokens=4)
    rows = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 1.5, 0.5, -3.0]])
    p = torch.softmax(rows.double(), dim=-1)
    gen = torch.Generator().manual_seed(0)
    for d0 in (0, 3):
        draws = [verify_draft(rows, [d0], params, [9], gen)[0] for _ in range(20000)]
        first = torch.bincount(torch.tensor([t[0] for t in draws]), minlength=4).double()
        assert chi2(first, p[0]) < critical
        second = [t[1] for t in draws if t[0] == d0]  # d0 kept: the bonus token from row 1
        counts = torch.bincount(torch.tensor(second), minlength=4).double()
        if counts.sum() > 1000:
            assert chi2(counts, p[1]) < critical
        assert all(len(t) == (2 if t[0] == d0 else 1) for t in draws)
