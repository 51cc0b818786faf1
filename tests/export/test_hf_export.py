from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model
from tinyllm.errors import ConfigError
from tinyllm.export import export
from tinyllm.quant.api import quantize
from tinyllm.quant.nf4 import NF4
from tinyllm.quant.rtn import RTN

pytest.importorskip("compressed_tensors")


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_float_export_loads_in_transformers(family, tokenizer, tmp_path: Path):
    model = tiny_model(family, vocab=len(tokenizer))
    export(model, tokenizer, tmp_path / "hf", "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    torch.testing.assert_close(
        _logits(_load(tmp_path / "hf"), tokenizer), _logits(model, tokenizer)
    )


@pytest.mark.parametrize(
    "cfg",
    [
        RTN(bits=4, group_size=32, sym=True),
        RTN(bits=4, group_size=64),
        RTN(bits=3, group_size=-1),
        RTN(bits=8, group_size=-1, sym=True),
    ],
)
def test_quantized_export_is_compressed_tensors(cfg, tokenizer, tmp_path: Path):
    """transformers + compressed-tensors decompress our integers to exactly our weights."""
    model = tiny_model(vocab=len(tokenizer))
    quantize(model, cfg)
    report = export(model, tokenizer, tmp_path / "hf", "hf")
    assert len(report["packed"]) == 14
    import json

    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    torch.testing.assert_close(
        _logits(_load(tmp_path / "hf"), tokenizer), _logits(model, tokenizer), atol=1e-5, rtol=0
    )


def test_nf4_is_written_as_float_or_refused(tokenizer, tmp_path: Path, caplog):
    model = tiny_model(vocab=len(tokenizer))
    quantize(model, NF4(block_size=64))
    with pytest.raises(ConfigError, match="codebook"):
        export(model, tokenizer, tmp_path / "a", "hf", strict=True)
    assert not (tmp_path / "a").exists()
    report = export(model, tokenizer, tmp_path / "b", "hf")  # float values, same function
    assert len(report["dequantized"]) == 14 and "written as float" in caplog.text
    torch.testing.assert_close(_logits(_load(tmp_path / "b"), tokenizer), _logits(model, tokenizer))


def test_existing_directory_refused(tokenizer, tmp_path: Path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "x").write_text("keep")
    with pytest.raises(ConfigError, match="--overwrite"):
        export(tiny_model(vocab=len(tokenizer)), tokenizer, tmp_path / "hf", "hf")
