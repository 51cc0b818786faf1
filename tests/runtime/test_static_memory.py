"""Static memory: in steady-state decode an engine step allocates no tensor memory (counted by
torch's profiler), the workspace stops growing, and the static path computes exactly what the
allocating path does."""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tests.conftest import tiny_config, tiny_model
from tinyllm.kernels import native
from tinyllm.runtime.engine import Engine, EngineConfig
from tinyllm.runtime.kv_cache import PagedKVCache, quantize_kv
from tinyllm.runtime.model import BatchItem, LeanRuntime, flat_batch
from tinyllm.runtime.sampling import SamplingParams

pytestmark = pytest.mark.skipif(native.q4_kernel() is None, reason="needs the native kernels")

PROMPTS = [[5, 9, 14], [20, 21, 22, 23, 24, 25, 26], list(range(30, 70)), [7]]


def packed(family: str):
    """A 4-bit model whose embedding is 8-bit and tied to the head (as `--embed-bits 8`)."""
    from transformers import AutoModelForCausalLM

    import tinyllm
    from tinyllm.quant.embed import embed_step

    cfg = tiny_config(family)
    cfg.tie_word_embeddings = True
    if family == "gemma3":  # a window the outputs exceed, and a final logit softcap
        cfg.num_hidden_layers, cfg.sliding_window = 3, 6
        cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
        cfg.final_logit_softcapping = 30.0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    tinyllm.quantize(model, tinyllm.RTN(bits=4, group_size=32))
    tinyllm.quantize(model, embed_step(8))
    return model


def allocations(fn) -> tuple[int, int]:
    """(tensor allocations, bytes) while fn runs, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.self_cpu_memory_usage > 0]
    return len(events), sum(e.self_cpu_memory_usage for e in events)


@pytest.mark.parametrize(
    ("family", "kv"), [("llama", "float16"), ("llama", "int8"), ("gemma3", "float32")]
)
def test_a_steady_state_decode_step_allocates_nothing(family, kv, tokenizer) -> None:
    model = packed(family)
    cfg = EngineConfig(kv_memory_mb=2.0, block_size=4, token_budget=64, kv_dtype=kv)
    eng = Engine(model, tokenizer, cfg)
    assert eng.runtime.ws is not None and eng.runtime.embed_q8 is not None
    for p in PROMPTS:
        eng.submit(p, SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(6):  # prefill, then decode until every buffer has its size
        eng.step()
    grown = eng.runtime.ws.grown
    count, nbytes = allocations(eng.step)
    assert (count, nbytes) == (0, 0)
    for _ in range(5):  # contexts cross block boundaries: still no growth
        assert eng.step() == len(PROMPTS)
    assert eng.runtime.ws.grown == grown
    # the allocating path would have allocated (the check can fail)
    eng.runtime.ws = None
    assert allocations(eng.step)[0] > 20


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_static_path_gives_the_same_logits_and_tokens(family, tokenizer) -> None:
    model = packed(family)
    static, plain = LeanRuntime(model, static=True), LeanRuntime(model)
    assert static.fuse_blocks  # decode steps run each block as one native call

    def logits(runtime, steps: int) -> list[torch.Tensor]:
        cache = PagedKVCache(runtime.cache_shape(torch.float16), 64, 4)
        seqs = {i: list(p) for i, p in enumerate(PROMPTS)}
        out = []
        for step in range(steps):
            items = []
            for sid, ids in seqs.items():
                if step == 0:
                    cache.add(sid)
                new = ids if step == 0 else ids[-1:]
                start = 0 if step == 0 else len(ids) - 1
                items.append(BatchItem(sid, new, start, cache.reserve(sid, len(new)), 1))
            got = runtime.forward(flat_batch(items, cache, runtime), cache).clone()
            out.append(got)
            for sid, row in zip(seqs, got.argmax(-1).tolist(), strict=True):
                seqs[sid].append(row)
        return out

    for a, b in zip(logits(static, 8), logits(plain, 8), strict=True):
        assert torch.equal(a, b)
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    cfg = EngineConfig(kv_memory_mb=2.0, block_size=4, token_budget=64)
    eng = Engine(model, tokenizer, cfg)
    first = [s.output for s in eng.generate(PROMPTS, greedy)]
    eng.runtime.ws = None
    assert [s.output for s in eng.generate(PROMPTS, greedy)] == first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_native_kv_write_stores_what_the_pytorch_write_stores(dtype) -> None:
    from tinyllm.runtime.kv_cache import CacheShape

    ops = native.q4_kernel()
    shape = CacheShape(1, (3,), 16, dtype)
    a, b = PagedKVCache(shape, 8, 4), PagedKVCache(shape, 8, 4)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, 3 * 16 * 3, generator=g) * 3  # k and v as strided views of one output
    qkv[2] = 0.0  # an all-zero row: scale 0
    k = qkv[:, : 3 * 16].reshape(5, 3, 16)
    v = qkv[:, 2 * 3 * 16 :].reshape(5, 3, 16)
    slots = torch.tensor([7, 0, 12, 31, 3])
    a.write(0, slots, k, v)
    b.write(0, slots, k, v, ops)
    assert torch.equal(a.k[0], b.k[0]) and torch.equal(a.v[0], b.v[0])
    if dtype == torch.int8:
        assert torch.equal(a.k_scale[0], b.k_scale[0]) and torch.equal(a.v_scale[0], b.v_scale[0])
        codes, scale = quantize_kv(k)
        assert torch.equal(b.k[0][slots], codes) and torch.equal(b.k_scale[0][slots], scale)
    with pytest.raises(RuntimeError, match="bad slot"):
        ops.kv_write(b.k[0], b.k_scale[0] if b.k_scale else torch.empty(0), slots + 100, k)


def test_native_ops_write_into_out_and_check_it() -> None:
    ops = native.q4_kernel()
    model = packed("llama")
    rt = LeanRuntime(model, static=True)
    codes, scale, mult = rt.embed_q8
    ids = torch.tensor([3, 0, 319, 3])
    out = torch.empty(4, 64)
    got = ops.q8_rows(codes, scale, ids, mult, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, rt.embed(ids))  # the embedding's own lookup, bit for bit
    with pytest.raises(RuntimeError, match="out must be"):
        ops.q8_rows(codes, scale, ids, mult, out=torch.empty(4, 63))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.q8_rows(codes, scale, torch.tensor([320]), mult)
    x = torch.randn(6, 2, 16)
    w = torch.rand(16)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    y = x.clone()
    ops.rms_norm(y, w, 1e-6, out=y)  # in place, per head
    torch.testing.assert_close(y, ref)


def test_runtime_lm_keeps_its_own_logits() -> None:
    """RuntimeLM keeps logits across batches: its runtime has no workspace."""
    from tests.conftest import tiny_tokenizer
    from tinyllm.runtime.lm import RuntimeLM

    lm = RuntimeLM(copy.deepcopy(tiny_model("llama")), tiny_tokenizer())
    assert lm.runtime.ws is None


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_steps_verify_an_int8_head_and_decode_what_the_exact_head_decodes(
    family, tokenizer
) -> None:
    """Exact mode, greedy requests: the q8 head runs on int8 activations and only the entries
    that could be a row's maximum are recomputed (runtime.argmax_candidates); the tokens equal
    the exact head's, for plain decoding and with a draft (verification rows)."""
    if not native.q4_kernel().q4_i8_supported():
        pytest.skip("needs AVX512-VNNI or AVX2")
    model = packed(family)
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    cfg = EngineConfig(kv_memory_mb=2.0, block_size=4, token_budget=64)
    eng = Engine(model, tokenizer, cfg)
    assert eng.runtime.head_l1 is not None
    first = [s.output for s in eng.generate(PROMPTS, greedy)]
    counts = eng.runtime.argmax_candidates
    assert counts is not None and (counts > 0).all() and (counts < 320).all()
    eng.runtime.head_l1 = None  # the exact float head for every entry
    assert [s.output for s in eng.generate(PROMPTS, greedy)] == first
    spec = Engine(
        model,
        tokenizer,
        EngineConfig(**{**cfg.__dict__, "speculate": 3}),
        draft=(copy.deepcopy(model), tokenizer),
    )
    assert [s.output for s in spec.generate(PROMPTS, greedy)] == first
    sampled = SamplingParams(max_tokens=4, temperature=0.8, seed=1)  # a step not argmax-only
    eng.runtime.head_l1, eng.runtime.argmax_candidates = LeanRuntime(model).head_l1, None
    eng.generate([PROMPTS[0]], sampled)
    assert eng.runtime.argmax_candidates is None
