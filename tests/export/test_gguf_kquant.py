"""K-quant grids end to end: quantize on them, checkpoint, export to GGUF, run in llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gq
from transformers import LlamaConfig, LlamaForCausalLM

import tinyllm
from tinyllm.checkpoint import save_checkpoint
from tinyllm.errors import ConfigError
from tinyllm.export import export
from tinyllm.kernels.qlinear import QuantLinear
from tinyllm.quant.api import quantize
from tinyllm.quant.gptq import GPTQ
from tinyllm.quant.rtn import RTN

FALLBACK = {"q2_k": T.Q4_0, "q3_k": T.Q4_0, "q4_k": T.Q5_0, "q5_k": T.Q5_1, "q6_k": T.Q8_0}


def _model(vocab: int, hidden: int = 64, ffn: int = 256) -> LlamaForCausalLM:
    """Hidden 64 (rows of 64: fallback types), FFN 256 (ffn_down rows are one super-block)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


def _tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("kind", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
def test_k_grids_export_bit_for_bit(kind: str, tokenizer, tmp_path: Path) -> None:
    model = _model(len(tokenizer))
    quantize(model, RTN(kquant=kind))
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.qweight.kquant == kind
    assert model.model.layers[1].self_attn.q_proj.qweight.kquant is None  # 64 inputs: fallback
    report = export(model, tokenizer, tmp_path / "k.gguf", "gguf", kind, strict=True)
    assert len(report.carried) == 14 and not report.requantized
    tensors = _tensors(tmp_path / "k.gguf")
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type == getattr(T, kind.upper())
    assert tensors["blk.1.attn_v.weight"].tensor_type == FALLBACK[kind]
    decoded = gq.dequantize(np.array(t.data), t.tensor_type).reshape(64, 256)
    np.testing.assert_array_equal(decoded, down.qweight.dequantize().numpy())


def test_gptq_on_k_grid_checkpoint_round_trip(tokenizer, tmp_path: Path) -> None:
    model = _model(len(tokenizer))
    x = torch.randint(0, len(tokenizer), (2, 24))
    with torch.no_grad():
        ref = model(x).logits
    calib = torch.randint(0, len(tokenizer), (8, 32))
    quantize(model, GPTQ(kquant="q3_k"), calib=calib, batch_size=4)
    assert model.model.layers[0].mlp.down_proj.qweight.kquant == "q3_k"
    with torch.no_grad():
        got = model(x).logits
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert float(cos) > 0.9
    save_checkpoint(model, tokenizer, tmp_path / "q", {})
    back, _ = tinyllm.load(tmp_path / "q")
    assert back.model.layers[0].mlp.down_proj.qweight.kquant == "q3_k"
    with torch.no_grad():
        assert torch.equal(back(x).logits, got)


def test_k_export_of_float_and_other_grids(tokenizer, tmp_path: Path, caplog) -> None:
    """Float tensors are quantized to the K type by tinyllm's own search; a grid that is not
    the K type's is refused under --strict and re-quantized (with a warning) otherwise."""
    model = _model(len(tokenizer))
    report = export(model, tokenizer, tmp_path / "f.gguf", "gguf", "q4_k")
    t = _tensors(tmp_path / "f.gguf")["blk.0.ffn_down.weight"]
    assert t.tensor_type == T.Q4_K
    decoded = gq.dequantize(np.array(t.data), T.Q4_K).reshape(64, 256)
    w = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert np.linalg.norm(decoded - w) < 0.1 * np.linalg.norm(w)
    assert report.types["blk.0.attn_q.weight"] == "Q5_0"
    quantize(model, RTN(bits=4, group_size=32))
    with pytest.raises(ConfigError, match="gguf-compatible"):
        export(model, tokenizer, tmp_path / "s.gguf", "gguf", "q4_k", strict=True)
    report = export(model, tokenizer, tmp_path / "r.gguf", "gguf", "q4_k")
    assert "blk.0.ffn_down.weight" in report.requantized


def test_k_records_are_not_carried_as_legacy_or_other_formats(tokenizer) -> None:
    """A Q4_1 block, MatMulNBits or compressed-tensors have no super-block scales and mins."""
    from tinyllm.export.gguf_blocks import why_not_carried
    from tinyllm.export.hf import why_not_packable
    from tinyllm.export.onnx import why_not_nbits

    model = _model(len(tokenizer))
    quantize(model, RTN(kquant="q4_k"))
    qw = model.model.layers[0].mlp.down_proj.qweight
    assert "q4_k" in why_not_carried(qw, T.Q4_1)
    assert "q4_k" in why_not_nbits(qw, 4)
    assert "q4_k" in why_not_packable(qw)


def test_kquant_config_errors() -> None:
    with pytest.raises(ValueError, match="kquant must be one of"):
        RTN(kquant="q7_k")
    with pytest.raises(ValueError, match="fixes bits at 4"):
        RTN(kquant="q4_k", bits=3)
    with pytest.raises(ValueError, match="static_groups"):
        GPTQ(kquant="q4_k", static_groups=False)
    with pytest.raises(ValueError, match=r"bits must be one of .* q6_k"):
        RTN(bits=6, group_size=32)
    with pytest.raises(ValueError, match=r"group_size must be one of .* K-quant"):
        RTN(bits=4, group_size=16)
    from tinyllm.quant.mixed import Mixed

    with pytest.raises(ValueError, match="not supported yet"):
        Mixed(base=GPTQ(kquant="q4_k"), avg_bits=4)


def test_qat_refuses_k_records(tokenizer) -> None:
    from tinyllm.quant.qat import FakeQuantLinear

    model = _model(len(tokenizer))
    quantize(model, RTN(kquant="q4_k"))
    with pytest.raises(ConfigError, match="QAT of q4_k"):
        FakeQuantLinear(model.model.layers[0].mlp.down_proj.qweight)


@pytest.mark.parametrize("kind", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
def test_llamacpp_runs_k_quant_file(kind: str, tokenizer, tmp_path: Path) -> None:
    """llama.cpp's own K-quant kernels on our blocks give our quantized model's logits."""
    pytest.importorskip("llama_cpp")
    from tinyllm.export import llamacpp

    model = _model(len(tokenizer))
    ids = tokenizer("Pack my box with five dozen liquor jugs.")["input_ids"][:24]
    with torch.no_grad():
        float_logits = model(torch.tensor([ids])).logits[0].numpy()
    quantize(model, RTN(kquant=kind))
    path = tmp_path / "k.gguf"
    export(model, tokenizer, path, "gguf", kind, embed_type="f32", strict=True)
    theirs = llamacpp.logits(llamacpp.open_gguf(path, n_ctx=64), ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    # llama.cpp rounds activations to 8 bits for its K-quant dot products: close to our
    # quantized model, and (where quantization moves the logits visibly) closer to it than to
    # the float model
    err = np.abs(theirs - ours).max()
    assert err < 0.02 * np.abs(ours).max()
    if kind in ("q2_k", "q3_k", "q4_k"):
        assert err < 0.5 * np.abs(theirs - float_logits).max()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"kquant": "q9_k"}, "kquant"),  # not a K type: the schema refuses it
        ({"kquant": "q6_k"}, "needs super-block tensor d"),  # q6_k: other bits, group, tensors
        ({"kquant": "q5_k", "bits": 5}, "needs"),  # codes and super-blocks disagree
    ],
)
def test_corrupted_k_checkpoint_is_refused(edit: dict, message: str, tokenizer, tmp_path) -> None:
    """A tinyllm.json whose K-quant entry does not match its tensors is a clear load error."""
    import json

    from tinyllm.checkpoint import TINYLLM_CONFIG
    from tinyllm.errors import ModelLoadError

    model = _model(len(tokenizer))
    quantize(model, RTN(kquant="q4_k"))
    save_checkpoint(model, tokenizer, tmp_path / "q", {})
    info = json.loads((tmp_path / "q" / TINYLLM_CONFIG).read_text())
    info["quantized"]["model.layers.0.mlp.down_proj"].update(edit)
    (tmp_path / "q" / TINYLLM_CONFIG).write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match=message):
        tinyllm.load(tmp_path / "q")


def test_auto_type_keeps_each_layers_own_grid(tokenizer, tmp_path: Path) -> None:
    """--type auto: a checkpoint mixing K, Q4_0 and Q8_0 grids is written layer by layer in the
    type each one's grid carries into, every code carried."""
    from tinyllm.quant.mixed import Mixed

    model = _model(len(tokenizer))
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:-1]
    wide = {n: 8 if "layers.0." in n and "down" not in n else 4 for n in layers}
    mixed = Mixed(base=RTN(bits=4, group_size=32, sym=True), bits=[4, 8], allocation=wide)
    quantize(model, mixed, calib=torch.randint(0, len(tokenizer), (2, 16)))
    report = export(model, tokenizer, tmp_path / "a.gguf", "gguf", "auto", strict=True)
    assert len(report.carried) == 14 and not report.requantized
    tensors = _tensors(tmp_path / "a.gguf")
    assert tensors["blk.0.attn_q.weight"].tensor_type == T.Q8_0
    assert tensors["blk.1.attn_q.weight"].tensor_type == T.Q4_0
    assert tensors["token_embd.weight"].tensor_type == T.Q8_0  # a float table: --embed-type's
    model = _model(len(tokenizer))
    quantize(model, RTN(kquant="q5_k"))
    export(model, tokenizer, tmp_path / "k.gguf", "gguf", "auto", strict=True)
    tensors = _tensors(tmp_path / "k.gguf")
    assert tensors["blk.0.ffn_down.weight"].tensor_type == T.Q5_K
    assert tensors["blk.0.ffn_up.weight"].tensor_type == T.Q5_1  # its fallback grid


def test_mixed_over_gguf_types_meets_budget_and_exports_each_choice(tokenizer, tmp_path) -> None:
    """Mixed over GGUF types: every layer gets a type that tiles it, the budget in GGUF bits
    per weight holds, GPTQ quantizes each layer on its type's grid, the checkpoint reloads with
    the same grids, and `--type auto` writes each layer as its chosen type, every code carried."""
    from tinyllm.quant.common import gguf_bpw
    from tinyllm.quant.mixed import Mixed

    model = _model(len(tokenizer))
    calib = torch.randint(0, len(tokenizer), (4, 32))
    types = ["q3_k", "q4_k", "q6_k", "q4_0", "q8_0"]
    mixed = Mixed(base=GPTQ(bits=4, group_size=32), types=types, target_bpw=5.0)
    report = quantize(model, mixed, calib=calib)
    alloc = report["bit_allocation"]
    sizes = {n: m.in_features * m.out_features for n, m in model.named_modules() if n in alloc}
    assert len(alloc) == 14 and set(alloc.values()) <= set(types)
    for name, t in alloc.items():  # K types only where rows are whole super-blocks
        assert ("down_proj" in name) or t in ("q4_0", "q8_0")
    bpw = sum(sizes[n] * gguf_bpw(t) for n, t in alloc.items()) / sum(sizes.values())
    assert bpw <= 5.0 and report["bpw"] == pytest.approx(bpw)
    assert len(set(alloc.values())) >= 2  # 5.0 lies between the types: the budget is spent
    for name, t in alloc.items():
        qw = model.get_submodule(name).qweight
        assert qw.kquant == (t if t.endswith("_k") else None)
    save_checkpoint(model, tokenizer, tmp_path / "q", {})
    loaded, _ = tinyllm.load(tmp_path / "q")
    ids = torch.randint(0, len(tokenizer), (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    out = export(loaded, tokenizer, tmp_path / "m.gguf", "gguf", "auto", strict=True)
    assert len(out.carried) == 14 and not out.requantized
    tensors = _tensors(tmp_path / "m.gguf")
    for name, t in alloc.items():
        block, local = name.split(".")[2], name.split(".")[-1]
        gg = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
        gg |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
        assert tensors[f"blk.{block}.{gg[local]}.weight"].tensor_type == getattr(T, t.upper())


def test_mixed_over_gguf_types_config_errors(tokenizer) -> None:
    from pydantic import ValidationError

    from tinyllm.quant.mixed import Mixed

    with pytest.raises(ValidationError, match="types must be among"):
        Mixed(base=GPTQ(), types=["q4_x"], target_bpw=4.5)
    with pytest.raises(ValidationError, match=r"target_bpw .* or size_mb, not avg_bits"):
        Mixed(base=GPTQ(), types=["q4_0"], avg_bits=4.5)
    with pytest.raises(ValidationError, match="give types too"):
        Mixed(base=GPTQ(), target_bpw=4.5)
    with pytest.raises(ValidationError, match=r"cannot quantize onto q4_k: .*static_groups"):
        Mixed(base=GPTQ(static_groups=False), types=["q4_k", "q5_0"], target_bpw=4.5)
    model = _model(len(tokenizer))
    calib = torch.randint(0, len(tokenizer), (2, 16))
    with pytest.raises(ConfigError, match=r"none of the types .* tiles the 64 input features"):
        quantize(model, Mixed(base=GPTQ(), types=["q4_k"], target_bpw=4.5), calib=calib)
    with pytest.raises(ConfigError, match=r"target_bpw 3\.0 is below the smallest reachable"):
        quantize(model, Mixed(base=GPTQ(), types=["q4_k", "q4_0"], target_bpw=3.0), calib=calib)


def test_mixed_sensitivity_cache_is_reused(tokenizer, tmp_path, monkeypatch) -> None:
    """A second budget reads the measured sensitivities back instead of measuring again."""
    import tinyllm.quant.mixed as mixed_mod
    from tinyllm.quant.mixed import Mixed

    cache = tmp_path / "sens.json"
    calib = torch.randint(0, len(tokenizer), (2, 16))
    types = ["q4_k", "q4_0", "q8_0"]
    step = Mixed(base=RTN(), types=types, target_bpw=6.0, sensitivity_cache=str(cache))
    first = quantize(_model(len(tokenizer)), step, calib=calib)
    assert cache.is_file()

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(mixed_mod, "measure_sensitivity", no_measuring)
    again = quantize(_model(len(tokenizer)), step, calib=calib)
    assert again["bit_allocation"] == first["bit_allocation"]
    assert again["sensitivity"] == first["sensitivity"]
    cheaper = step.model_copy(update={"target_bpw": 5.0})
    assert quantize(_model(len(tokenizer)), cheaper, calib=calib)["bpw"] <= 5.0
    other = step.model_copy(update={"sensitivity_seq_len": 8})  # other probe windows: measure
    with pytest.raises(AssertionError, match="measured again"):
        quantize(_model(len(tokenizer)), other, calib=calib)
