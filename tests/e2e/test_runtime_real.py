"""The runtime on the real models (slow): FP32 greedy output identical to transformers'
generate for 64 tokens on 10 prompts, all ten decoding in one batch (SmolLM2, Gemma 3); an
INT4 checkpoint through the engine identical to the same checkpoint through tinyllm.load."""

import pytest
import torch

from tests.e2e.common import PROMPTS, our_greedy

pytestmark = pytest.mark.slow

TEN = [
    *PROMPTS,
    "Water is made of",
    "The largest planet in the solar system",
    "Once upon a time, in a small village,",
    "import numpy as np\n",
    "The French Revolution began in",
]


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_fp32_batched_greedy_equals_transformers_generate(name: str) -> None:
    import tinyllm
    from tinyllm.runtime.engine import Engine, EngineConfig
    from tinyllm.runtime.sampling import SamplingParams

    model, tok = tinyllm.load(name)
    engine = Engine(model, tok, EngineConfig(kv_memory_mb=64, kv_dtype="float32"))
    assert engine.fallback is None  # the lean forward, for Gemma 3 too
    ids = [tok.encode(p) for p in TEN]
    seqs = engine.generate(ids, SamplingParams(max_tokens=64))
    eos = model.generation_config.eos_token_id
    for p, s in zip(ids, seqs, strict=True):
        out = model.generate(torch.tensor([p]), max_new_tokens=64, do_sample=False)
        ref = out[0, len(p) :].tolist()
        if s.finish_reason == "stop":  # both stop at end-of-text; generate keeps the token
            assert ref[-1] == eos or ref[-1] in eos
            ref = ref[:-1]
        assert s.output == ref, tok.decode(p)
    assert engine.cache.used_blocks == 0


def test_int4_checkpoint_engine_equals_tinyllm_load(tmp_path) -> None:
    import tinyllm
    from tinyllm.quant.embed import Embeddings
    from tinyllm.runtime.engine import Engine, EngineConfig
    from tinyllm.runtime.sampling import SamplingParams

    model, tok = tinyllm.load("smollm2-135m")
    tinyllm.quantize(model, tinyllm.RTN(bits=4, group_size=64))
    tinyllm.quantize(model, Embeddings(bits=8))
    tinyllm.save_checkpoint(model, tok, tmp_path / "int4", {"steps": []})
    loaded, tok2 = tinyllm.load(tmp_path / "int4")
    kernels = {getattr(m, "kernel", None) for m in loaded.modules()} - {None}
    assert "q4" in kernels
    engine = Engine(loaded, tok2, EngineConfig(kv_memory_mb=32, kv_dtype="float32"))
    ids = [tok2.encode(p) for p in TEN[:5]]
    seqs = engine.generate(ids, SamplingParams(max_tokens=48, ignore_eos=True))
    for p, s in zip(ids, seqs, strict=True):
        assert s.output == our_greedy(loaded, p, 48), tok2.decode(p)
