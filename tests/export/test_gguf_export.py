from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gq

from tests.conftest import tiny_config, tiny_model
from tinyllm.errors import ArchitectureError, ConfigError
from tinyllm.export import export
from tinyllm.export.gguf_blocks import permute_rows
from tinyllm.kernels.qlinear import QuantLinear
from tinyllm.quant.api import quantize
from tinyllm.quant.rtn import RTN


def _read(path: Path) -> tuple[GGUFReader, dict]:
    r = GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def _field(r: GGUFReader, key: str):
    return r.fields[key].contents()


def _decoded(t) -> np.ndarray:
    """A tensor of the file as float [rows, cols], decoded by gguf's own code."""
    data = gq.dequantize(np.array(t.data), t.tensor_type)
    return data.reshape(int(t.shape[1]), int(t.shape[0])) if len(t.shape) == 2 else data


def test_f16_export_metadata_and_tensors(tokenizer, tmp_path: Path):
    model = tiny_model(vocab=len(tokenizer))
    path = tmp_path / "m.gguf"
    export(model, tokenizer, path, "gguf", "f16")
    r, tensors = _read(path)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.block_count") == 2
    assert _field(r, "llama.attention.head_count_kv") == 2
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
    assert len(tensors) == 2 * 9 + 3  # 9 per block, embeddings, final norm, untied head
    emb = _decoded(tensors["token_embd.weight"])
    ref = model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-3)
    q = _decoded(tensors["blk.0.attn_q.weight"])
    want = permute_rows(model.model.layers[0].self_attn.q_proj.weight.detach(), 4).numpy()
    np.testing.assert_allclose(q, want, atol=1e-3)


def test_quantized_layers_are_carried_bit_for_bit(tokenizer, tmp_path: Path):
    model = tiny_model(vocab=len(tokenizer))
    quantize(model, RTN(bits=4, group_size=32, sym=True))
    path = tmp_path / "q.gguf"
    report = export(model, tokenizer, path, "gguf", "q4_0", strict=True)
    assert len(report.carried) == 14 and not report.requantized
    _, tensors = _read(path)
    assert tensors["blk.1.ffn_down.weight"].tensor_type == T.Q4_0
    for name, mod in (
        ("blk.1.ffn_down.weight", model.model.layers[1].mlp.down_proj),
        ("blk.0.attn_k.weight", model.model.layers[0].self_attn.k_proj),
    ):
        assert isinstance(mod, QuantLinear)
        ours = mod.qweight.dequantize()
        if "attn_k" in name:
            ours = permute_rows(ours, 2)
        np.testing.assert_array_equal(_decoded(tensors[name]), ours.numpy())


def test_grid_mismatch_warns_or_refuses(tokenizer, tmp_path: Path, caplog):
    model = tiny_model(vocab=len(tokenizer))
    quantize(model, RTN(bits=3, group_size=32))
    with pytest.raises(ConfigError, match="gguf-compatible"):
        export(model, tokenizer, tmp_path / "a.gguf", "gguf", "q4_0", strict=True)
    assert not (tmp_path / "a.gguf").exists()
    report = export(model, tokenizer, tmp_path / "b.gguf", "gguf", "q4_0")
    assert len(report.requantized) == 14 and "3-bit" in next(iter(report.requantized.values()))
    assert "re-quantized" in caplog.text


def test_bad_outputs_and_architectures(tokenizer, tmp_path: Path):
    model = tiny_model(vocab=len(tokenizer))
    with pytest.raises(ConfigError, match="does not exist"):
        export(model, tokenizer, tmp_path / "missing" / "m.gguf")
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(ConfigError, match="--overwrite"):
        export(model, tokenizer, tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match="q4_0"):
        export(model, tokenizer, tmp_path / "n.gguf", "gguf", "q4_x")
    with pytest.raises(ArchitectureError, match="supported: gemma3_text, llama"):
        export(tiny_model("opt", vocab=len(tokenizer)), tokenizer, tmp_path / "o.gguf")


def test_interrupted_export_leaves_nothing(tokenizer, tmp_path: Path, monkeypatch):
    from gguf import GGUFWriter

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_model(vocab=len(tokenizer)), tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# llama.cpp itself reads the files (skipped when llama-cpp-python is not installed)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3"])
def test_llamacpp_logits_match_ours(family, tokenizer, tmp_path: Path):
    pytest.importorskip("llama_cpp")
    from tinyllm.export import llamacpp

    model = tiny_model(family, vocab=len(tokenizer))
    path = tmp_path / "m.gguf"
    export(model, tokenizer, path, "gguf", "f32")
    ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"][:24]
    theirs = llamacpp.logits(llamacpp.open_gguf(path, n_ctx=64), ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-3, rtol=0)


def test_llamacpp_logits_refuse_a_sequence_longer_than_the_context(tokenizer, tmp_path: Path):
    """A window longer than llama.cpp's context (Gemma's BOS + 512 in a 512 context) is a clear
    ConfigError naming both lengths, not llama_decode's bare return code."""
    pytest.importorskip("llama_cpp")
    from tinyllm.errors import ConfigError
    from tinyllm.export import llamacpp

    path = tmp_path / "m.gguf"
    export(tiny_model(vocab=len(tokenizer)), tokenizer, path, "gguf", "f32")
    llm = llamacpp.open_gguf(path, n_ctx=256)
    with pytest.raises(ConfigError, match=f"{llm.n_ctx() + 1} tokens"):
        llamacpp.logits(llm, [5] * (llm.n_ctx() + 1))
    assert llamacpp.logits(llm, [5] * 8).shape == (8, len(tokenizer))  # still usable after


def test_llamacpp_runs_carried_q4_0(tokenizer, tmp_path: Path):
    pytest.importorskip("llama_cpp")
    from tinyllm.export import llamacpp

    model = tiny_model(vocab=len(tokenizer))
    ids = torch.tensor([tokenizer("Pack my box with five dozen liquor jugs.")["input_ids"][:24]])
    with torch.no_grad():
        float_logits = model(ids).logits[0].numpy()
    quantize(model, RTN(bits=4, group_size=32, sym=True))
    path = tmp_path / "q.gguf"
    export(model, tokenizer, path, "gguf", "q4_0", embed_type="f32", strict=True)
    theirs = llamacpp.logits(llamacpp.open_gguf(path, n_ctx=64), ids[0].tolist())
    with torch.no_grad():
        ours = model(ids).logits[0].numpy()
    # llama.cpp rounds activations to 8 bits for Q4_0 dot products: close to our quantized
    # model, and much closer to it than to the float model it came from
    err = np.abs(theirs - ours).max()
    assert err < 0.05 * np.abs(ours).max()
    assert err < 0.5 * np.abs(theirs - float_logits).max()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_llamacpp_runs_quantized_embeddings(family, tokenizer, tmp_path: Path):
    """A q8_0 embedding table (tied head) carried from tinyllm's record, run by llama.cpp."""
    pytest.importorskip("llama_cpp")
    from tinyllm.export import llamacpp
    from tinyllm.quant.embed import Embeddings

    model = tiny_model(family, vocab=len(tokenizer))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    quantize(model, Embeddings(bits=8))
    path = tmp_path / "e.gguf"
    report = export(model, tokenizer, path, "gguf", "f32", strict=True)
    assert "token_embd.weight" in report.carried
    ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"][:24]
    theirs = llamacpp.logits(llamacpp.open_gguf(path, n_ctx=64), ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    # the head's q8_0 dot products round activations to 8 bits in llama.cpp
    assert np.abs(theirs - ours).max() < 0.02 * np.abs(ours).max()


def test_llamacpp_score_matches_our_metrics(tokenizer, tmp_path: Path):
    """llamacpp.score computes perplexity, KLD and top-1 agreement the way `tinyllm eval` does:
    an F32 export is scored against the model itself (KLD ~ 0, full agreement), and a carried
    4-bit export against the float model it came from gives the KLD of our own quantized model.
    """
    pytest.importorskip("llama_cpp")
    import copy

    from tinyllm.eval.divergence import token_kl, top1_agree
    from tinyllm.eval.perplexity import perplexity, token_nll
    from tinyllm.export import llamacpp

    model = tiny_model(vocab=len(tokenizer))
    text = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs. " * 4
    windows = torch.tensor(tokenizer(text)["input_ids"][:96]).view(3, 32)
    path = tmp_path / "m.gguf"
    export(model, tokenizer, path, "gguf", "f32")
    same = llamacpp.score(llamacpp.open_gguf(path, n_ctx=64), windows, model)
    with torch.no_grad():
        ours = model(windows).logits[:, :-1]
    ppl = perplexity(float(token_nll(ours, windows[:, 1:]).double().sum()), 3 * 31)
    assert same["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert same["kld"] < 1e-5 and same["top1_agreement"] == 1.0

    q = copy.deepcopy(model)
    quantize(q, RTN(bits=4, group_size=32, sym=True))
    export(q, tokenizer, tmp_path / "q.gguf", "gguf", "q4_0", embed_type="f32", strict=True)
    got = llamacpp.score(llamacpp.open_gguf(tmp_path / "q.gguf", n_ctx=64), windows, model)
    with torch.no_grad():
        mine = q(windows).logits[:, :-1]
    kld = float(token_kl(ours, mine).mean())
    assert kld > 5e-5 > 5 * same["kld"]  # 4 bits moved the model: the check below can fail
    assert got["kld"] == pytest.approx(kld, rel=0.1)  # llama.cpp's 8-bit activations add a little
    assert got["top1_agreement"] == pytest.approx(
        float(top1_agree(ours, mine).float().mean()), abs=0.1
    )


def test_llama3_rope_scaling_runs_in_llamacpp(tokenizer, tmp_path: Path):
    """Llama-3.1/3.2 scale RoPE by frequency ('llama3'): the file carries rope_freqs.weight and
    llama.cpp's logits match ours; the scaling changes the logits here, so the check can fail."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from tinyllm.export import llamacpp

    cfg = tiny_config("llama", vocab=len(tokenizer))
    plain = cfg.rope_parameters.get("rope_theta", 10000.0)
    cfg.rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": plain,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    cfg.initializer_range = 0.1  # sharp enough attention for positions to matter
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    path = tmp_path / "m.gguf"
    export(model, tokenizer, path, "gguf", "f32")
    r, _ = _read(path)
    assert next(t.name for t in r.tensors) == "rope_freqs.weight"
    ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"][:24]
    theirs = llamacpp.logits(llamacpp.open_gguf(path, n_ctx=64), ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": plain}
        unscaled = AutoModelForCausalLM.from_config(cfg).eval()
        unscaled.load_state_dict(model.state_dict())
        other = unscaled(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(other - ours).max() > 100 * 5e-3  # (1.67 here)
    np.testing.assert_allclose(theirs, ours, atol=5e-3, rtol=0)  # (2e-3 here)
