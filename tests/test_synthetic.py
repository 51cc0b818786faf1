"""benchmarks/synthetic.py: synthetic models of real shapes, written without materializing them."""

from __future__ import annotations

import hashlib
import json
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import synthetic  # noqa: E402

SHARD = 40 * 10**6  # small shards so a 2-block model is split over several files


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from tests.conftest import tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def smol2(tmp_path_factory, tok_dir) -> Path:
    """smollm2-360m with 2 blocks (~135 MB), seed 0."""
    out = tmp_path_factory.mktemp("synth") / "smol2"
    synthetic.write_model("smollm2-360m", out, 0, 2, SHARD, str(tok_dir), progress=False)
    return out


def _digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.glob("*.safetensors"))
    }


def test_loads_with_tinyllm_and_transformers_in_the_configs_shapes(smol2):
    from transformers import AutoModelForCausalLM

    import tinyllm

    cfg = synthetic.SYNTHETIC["smollm2-360m"]
    index = json.loads((smol2 / synthetic.INDEX_FILE).read_text())
    shards = sorted(p.name for p in smol2.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        (smol2 / s).stat().st_size - 8 - int.from_bytes((smol2 / s).read_bytes()[:8], "little")
        for s in shards
    )
    assert "lm_head.weight" not in index["weight_map"]  # tied: not stored
    model, tok = tinyllm.load(smol2)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    hidden, ffn, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    block = model.model.layers[1]
    assert model.model.embed_tokens.weight.shape == (cfg["vocab_size"], hidden)
    assert block.self_attn.q_proj.weight.shape == (hidden, hidden)
    assert block.self_attn.k_proj.weight.shape == (kv * cfg["head_dim"], hidden)
    assert block.mlp.down_proj.weight.shape == (hidden, ffn)
    assert len(tok) == cfg["vocab_size"]
    hf = AutoModelForCausalLM.from_pretrained(smol2)
    assert hf.dtype == torch.bfloat16
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    w = hf.model.layers[0].self_attn.q_proj.weight.float()
    assert torch.equal(w, model.model.layers[0].self_attn.q_proj.weight)
    assert abs(w.std().item() - synthetic.STD) < 1e-3
    down = hf.model.layers[0].mlp.down_proj.weight.float().std().item()
    assert abs(down - synthetic.STD / 2) < 1e-3  # 1/sqrt(2 * 2 blocks)
    assert torch.all(hf.model.layers[0].input_layernorm.weight == 1)


def test_same_seed_same_bytes_other_seed_other_bytes(smol2, tok_dir, tmp_path):
    again = tmp_path / "again"
    synthetic.write_model("smollm2-360m", again, 0, 2, SHARD, str(tok_dir), progress=False)
    assert _digests(again) == _digests(smol2)
    other = tmp_path / "other"
    synthetic.write_model("smollm2-360m", other, 1, 2, SHARD, str(tok_dir), progress=False)
    assert set(_digests(other).values()).isdisjoint(_digests(smol2).values())


def test_a_tensors_bytes_do_not_depend_on_the_shard_layout(smol2, tok_dir, tmp_path):
    one = tmp_path / "one"
    synthetic.write_model("smollm2-360m", one, 0, 2, 10**10, str(tok_dir), progress=False)
    assert len(list(one.glob("model-*.safetensors"))) == 1
    name = "model.layers.1.mlp.up_proj.weight"
    shard = json.loads((smol2 / synthetic.INDEX_FILE).read_text())["weight_map"][name]
    with (
        safe_open(str(smol2 / shard), "pt") as a,
        safe_open(str(one / synthetic.shard_name(0, 1)), "pt") as b,
    ):
        assert torch.equal(a.get_tensor(name), b.get_tensor(name))


def test_specs_follow_the_config(tok_dir):
    qwen = {s.name: s for s in synthetic.tensor_specs(synthetic.model_config("qwen2.5-1.5b", 1))}
    assert qwen["model.layers.0.self_attn.k_proj.bias"].init == "zeros"
    assert qwen["model.layers.0.self_attn.k_proj.weight"].shape == (256, 1536)  # 2 kv x 128
    assert qwen["model.norm.weight"].init == "ones"
    assert "lm_head.weight" not in qwen
    big = {s.name: s for s in synthetic.tensor_specs(synthetic.model_config("llama-3.1-8b", 1))}
    assert big["lm_head.weight"].shape == (128256, 4096)  # untied: stored
    assert big["model.layers.0.mlp.gate_proj.weight"].shape == (14336, 4096)
    full = synthetic.tensor_specs(synthetic.model_config("llama-3.2-1b"))
    assert 1.23e9 < sum(s.numel for s in full) < 1.24e9  # Llama-3.2-1B: 1.236 B parameters


def test_padded_tokenizer_decodes_every_id_of_the_model(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    size = synthetic.write_tokenizer(tmp_path, 1000, str(tok_dir))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert size == len(tok) == 1000
    assert tok.decode([999]) == synthetic.PAD_TOKEN.format(999)
    assert max(tok.encode(synthetic.PAD_TOKEN.format(500))) < 320  # never produced by encoding


def test_the_writer_holds_one_chunk_at_a_time(tmp_path):
    """Each chunk is freed before the next is drawn: the writer never accumulates a shard."""
    specs = [synthetic.TensorSpec(f"t{i}", (64, 1024), "normal", 0.02) for i in range(3)]
    alive, most = [0], [0]

    def chunks(spec):
        for _ in range(4):
            t = torch.zeros(16 * 1024, dtype=torch.bfloat16)
            alive[0] += 1
            most[0] = max(most[0], alive[0])
            weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - 1))
            yield t

    synthetic.write_safetensors(tmp_path / "x.safetensors", specs, chunks)
    assert most[0] == 1 and alive[0] == 0
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.get_tensor("t2").shape == (64, 1024)


def test_writing_300_mb_keeps_peak_rss_near_one_chunk(tmp_path):
    from tinyllm.util.memory import PeakRSS

    specs = [synthetic.TensorSpec(f"t{i}", (2048, 8192), "normal", 0.02) for i in range(10)]
    with PeakRSS(interval=0.01) as rss:
        start = rss.peak
        synthetic.write_weights(tmp_path, specs, seed=0, shard_bytes=10**8)
    assert sum(p.stat().st_size for p in tmp_path.glob("*.safetensors")) > 3.3e8
    assert rss.peak - start < 160 * 2**20  # one chunk: 64 MB fp32 + 32 MB bf16, not 335 MB
