from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_model
from tinyllm.errors import ArchitectureError, ConfigError
from tinyllm.export import export
from tinyllm.quant.api import quantize
from tinyllm.quant.rtn import RTN

pytest.importorskip("onnxruntime")
from tinyllm.export import onnxrt

PROMPT = "The quick brown fox jumps over the lazy dog."


def _ours(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fp32_logits_and_cached_generation_match(family, tokenizer, tmp_path: Path):
    model = tiny_model(family, vocab=len(tokenizer))
    export(model, tokenizer, tmp_path / "m.onnx", "onnx")
    assert (tmp_path / "m.onnx.data").exists()
    sess = onnxrt.open_onnx(tmp_path / "m.onnx")
    ids = tokenizer(PROMPT)["input_ids"][:20]
    assert np.abs(onnxrt.logits(sess, ids) - _ours(model, ids)).max() < 1e-4
    with torch.no_grad():
        want = model.generate(
            torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )[0, len(ids) :].tolist()
    assert onnxrt.greedy(sess, ids, 12) == want  # step by step through the returned cache


@pytest.mark.parametrize(
    ("cfg", "qtype"),
    [
        (RTN(bits=4, group_size=32, sym=True), "q4"),
        (RTN(bits=4, group_size=64), "q4"),
        (RTN(bits=8, group_size=32, sym=True), "q8"),
    ],
)
def test_matmulnbits_carries_our_integers(cfg, qtype, tokenizer, tmp_path: Path):
    model = tiny_model(vocab=len(tokenizer))
    quantize(model, cfg)
    report = export(model, tokenizer, tmp_path / "q.onnx", "onnx", qtype)
    assert len(report.nbits) == 14 and not report.float_layers
    import onnx

    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx", load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    ids = tokenizer(PROMPT)["input_ids"][:20]
    sess = onnxrt.open_onnx(tmp_path / "q.onnx")
    assert np.abs(onnxrt.logits(sess, ids) - _ours(model, ids)).max() < 1e-4


def test_layers_that_cannot_be_carried(tokenizer, tmp_path: Path, caplog):
    model = tiny_model(vocab=len(tokenizer))
    quantize(model, RTN(bits=3, group_size=32))
    with pytest.raises(ConfigError, match="3-bit codes"):
        export(model, tokenizer, tmp_path / "a.onnx", "onnx", "q4", strict=True)
    assert list(tmp_path.iterdir()) == []
    report = export(model, tokenizer, tmp_path / "b.onnx", "onnx", "q4")
    assert len(report.float_layers) == 14 and "written as float" in caplog.text
    ids = tokenizer(PROMPT)["input_ids"][:20]
    sess = onnxrt.open_onnx(tmp_path / "b.onnx")
    assert np.abs(onnxrt.logits(sess, ids) - _ours(model, ids)).max() < 1e-4


def test_onnx_bad_input(tokenizer, tmp_path: Path, monkeypatch):
    with pytest.raises(ArchitectureError, match="llama, mistral, qwen2"):
        export(tiny_model("gemma3", vocab=len(tokenizer)), tokenizer, tmp_path / "g.onnx", "onnx")
    model = tiny_model(vocab=len(tokenizer))
    with pytest.raises(ConfigError, match="quantize it first"):
        export(model, tokenizer, tmp_path / "f.onnx", "onnx", "q4")
    with pytest.raises(ConfigError, match="fp32, q4, q8"):
        export(model, tokenizer, tmp_path / "f.onnx", "onnx", "int3")
    import onnx

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        export(model, tokenizer, tmp_path / "m.onnx", "onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "method",
    ["int8-dynamic", "int8-static", "int8-static-channel-asym", "smoothquant"],
)
def test_w8a8_as_integer_ops_matches_ours(method, tokenizer, tmp_path: Path):
    import onnx

    from tinyllm.quant.int8 import Int8Dynamic, Int8Static
    from tinyllm.quant.smoothquant import SmoothQuant

    cfg = {
        "int8-dynamic": Int8Dynamic(),
        "int8-static": Int8Static(),
        "int8-static-channel-asym": Int8Static(granularity="channel", act_sym=False),
        "smoothquant": SmoothQuant(),
    }[method]
    model = tiny_model(vocab=len(tokenizer))
    calib = torch.randint(0, len(tokenizer), (16, 64), generator=torch.Generator().manual_seed(0))
    quantize(model, cfg, calib=calib)
    report = export(model, tokenizer, tmp_path / "w.onnx", "onnx", "w8a8")
    assert len(report.nbits) == 14 and not report.float_layers
    ops = {n.op_type for n in onnx.load(tmp_path / "w.onnx", load_external_data=False).graph.node}
    assert "MatMulInteger" in ops
    assert ("QuantizeLinear" in ops) != (method == "int8-dynamic")
    sess = onnxrt.open_onnx(tmp_path / "w.onnx")
    ids = tokenizer(PROMPT)["input_ids"][:20]
    ours = _ours(model, ids)
    # same integer codes; only float rounding of the rescale differs (and a rare tie in rounding)
    assert np.abs(onnxrt.logits(sess, ids) - ours).max() < 2e-3 * np.abs(ours).max()


def test_w8a8_type_needs_w8a8_layers(tokenizer, tmp_path: Path):
    model = tiny_model(vocab=len(tokenizer))
    with pytest.raises(ConfigError, match="has none; quantize it first"):
        export(model, tokenizer, tmp_path / "w.onnx", "onnx", "w8a8")
