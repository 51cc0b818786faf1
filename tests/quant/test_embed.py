"""Quantized embeddings and head: row lookups, tied records stored once, checkpoints, export."""

from __future__ import annotations

import json

import pytest
import torch

import tinyllm
from tests.conftest import tiny_config
from tests.test_cli import run
from tinyllm.checkpoint import round_floats
from tinyllm.errors import ConfigError
from tinyllm.kernels.qlinear import QuantEmbedding, QuantLinear
from tinyllm.quant.embed import Embeddings, embed_step, tied_head
from tinyllm.quant.rtn import RTN, rtn_quantize


def _model(family: str = "llama", tied: bool = True, vocab: int = 320):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, vocab=vocab)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [3, 4, 5, 8])
@pytest.mark.parametrize("cols", [64, 36])
def test_row_lookup_equals_full_dequantization(bits: int, cols: int) -> None:
    w = torch.randn(50, cols)
    qw = rtn_quantize(w, RTN(bits=bits, group_size=-1 if cols == 36 else 32))
    idx = torch.tensor([3, 0, 49, 3])
    torch.testing.assert_close(qw.rows(idx), qw.dequantize()[idx], rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_quantized_embeddings_match_float_and_reload_exactly(family, tied, tmp_path, tokenizer):
    model = _model(family, tied, vocab=len(tokenizer))
    with torch.no_grad():
        ref = model(IDS).logits
    report = tinyllm.quantize(model, Embeddings(bits=8))
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert isinstance(model.get_output_embeddings(), QuantLinear)
    assert tied_head(model) == tied and len(report["layer_errors"]) == (1 if tied else 2)
    assert model.get_output_embeddings().kernel in ("q8", "int8")  # 8 bits per row: int8 kernels
    from tinyllm.models.size import param_count

    assert param_count(model) == param_count(_model(family, tied, vocab=len(tokenizer)))
    with torch.no_grad():
        out = model(IDS).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # 8-bit: close to float
    round_floats(model, torch.float16)
    with torch.no_grad():
        out = model(IDS).logits
    tinyllm.save_checkpoint(model, tokenizer, tmp_path / "q", {"steps": []})
    info = json.loads((tmp_path / "q" / "tinyllm.json").read_text())
    assert ("tied_to" in json.dumps(info["quantized"])) == tied
    again, _ = tinyllm.load(tmp_path / "q")
    assert tied_head(again) == tied
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, out, rtol=0, atol=0)


def test_tied_table_is_stored_once(tmp_path, tokenizer) -> None:
    sizes = {}
    for bits in (None, 8, 4):
        model = _model(vocab=len(tokenizer))
        if bits:
            tinyllm.quantize(model, embed_step(bits))
        round_floats(model, torch.float16)
        tinyllm.save_checkpoint(model, tokenizer, tmp_path / str(bits), {"steps": []})
        sizes[bits] = (tmp_path / str(bits) / "model.safetensors").stat().st_size
    table = len(tokenizer) * 64
    assert sizes[None] - sizes[8] > 0.85 * table  # 2 -> 1.09 bytes per weight, one copy
    assert sizes[8] - sizes[4] > 0.45 * table


def test_gguf_carries_a_q8_0_table_and_other_paths_refuse(tmp_path, tokenizer) -> None:
    from gguf import GGUFReader

    from tinyllm.distill.student import prepare_for_training
    from tinyllm.export import export
    from tinyllm.prune.api import prune
    from tinyllm.prune.magnitude import Magnitude

    model = _model(vocab=len(tokenizer))
    tinyllm.quantize(model, Embeddings(bits=8, group_size=32, sym=True))
    report = export(model, tokenizer, tmp_path / "m.gguf", "gguf", "f16")
    assert "token_embd.weight" in report.carried
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types  # tied
    with pytest.raises(ConfigError, match="quantized embeddings"):
        export(model, tokenizer, tmp_path / "m.onnx", "onnx")
    with pytest.raises(ConfigError, match="quantize the embeddings after training"):
        prepare_for_training(model)
    with pytest.raises(ConfigError, match="prune the float model first"):
        prune(model, Magnitude(sparsity=0.5))
    with pytest.raises(ConfigError, match="already quantized"):
        tinyllm.quantize(model, Embeddings(bits=8))


def test_cli_embed_bits(tiny_dir, tmp_path) -> None:
    out = tmp_path / "q"
    p = run("quantize", str(tiny_dir), "--method", "rtn", "--embed-bits", "8", "-o", str(out))
    assert p.returncode == 0, p.stderr
    steps = json.loads((out / "tinyllm.json").read_text())["steps"]
    assert [s["type"] for s in steps] == ["rtn", "embeddings"]
    model, _ = tinyllm.load(out)
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
