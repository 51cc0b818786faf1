"""IQ4_NL (llama.cpp's non-uniform 4-bit table): the block search, bit-exact carry into GGUF,
GPTQ on the table, checkpoints, --type auto, mixed over types, and llama.cpp running the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gq

import tinyllm
from tests.export.test_gguf_kquant import _model
from tinyllm.checkpoint import save_checkpoint
from tinyllm.export import export
from tinyllm.export.gguf_blocks import carry_iq4nl
from tinyllm.kernels.iq4grid import IQ4NL_VALUES, fit_iq4nl
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.quant.api import quantize
from tinyllm.quant.gptq import GPTQ
from tinyllm.quant.rtn import RTN, rtn_quantize


def test_block_search_beats_q4_0_and_carries_bit_for_bit() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w[3, :32] = 0.0  # an all-zero block
    qw = QuantizedWeight.from_iq4nl(*fit_iq4nl(w))
    q4 = rtn_quantize(w, RTN(bits=4, group_size=32, sym=True))
    err_nl = (qw.dequantize() - w).pow(2).sum()
    err_q4 = (q4.dequantize() - w).pow(2).sum()
    assert err_nl < 0.85 * err_q4  # Gaussian weights: the table's density near 0 pays
    assert torch.equal(qw.dequantize()[3, :32], torch.zeros(32))
    blocks = carry_iq4nl(qw)
    assert blocks.shape == (64, 8 * 18)  # 18 bytes per 32 weights: 4.5 bits per weight
    theirs = gq.dequantize(blocks, T.IQ4_NL).reshape(64, 256)
    assert np.array_equal(theirs, qw.dequantize().numpy())
    assert set(np.unique(qw.codebook.numpy()).tolist()) == set(IQ4NL_VALUES)


def test_importance_weighting_lowers_the_weighted_error() -> None:
    torch.manual_seed(1)
    w = torch.randn(32, 128)
    a = torch.rand(128) ** 4
    plain = QuantizedWeight.from_iq4nl(*fit_iq4nl(w)).dequantize()
    weighted = QuantizedWeight.from_iq4nl(*fit_iq4nl(w, a)).dequantize()
    assert ((weighted - w).pow(2) * a).sum() < ((plain - w).pow(2) * a).sum()


def test_gptq_iq4nl_checkpoint_export_and_auto(tokenizer, tmp_path: Path) -> None:
    model = _model(len(tokenizer))
    x = torch.randint(0, len(tokenizer), (1, 16))
    quantize(model, GPTQ(codebook="iq4_nl"), calib=torch.randint(0, len(tokenizer), (8, 32)))
    qw = model.model.layers[0].mlp.down_proj.qweight
    assert qw.group_size == 32 and torch.equal(qw.codebook, torch.tensor(IQ4NL_VALUES).float())
    with torch.no_grad():
        got = model(x).logits
    save_checkpoint(model, tokenizer, tmp_path / "q", {})
    back, _ = tinyllm.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(back(x).logits, got)
    for kind in ("iq4_nl", "auto"):
        report = export(back, tokenizer, tmp_path / f"{kind}.gguf", "gguf", kind, strict=True)
        assert len(report.carried) == 14 and not report.requantized
        types = {t.tensor_type for t in GGUFReader(str(tmp_path / f"{kind}.gguf")).tensors}
        assert T.IQ4_NL in types and T.Q4_0 not in types


def test_iq4nl_config_errors() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="codebook must be one of iq4_nl"):
        RTN(codebook="iq3_xxs")
    with pytest.raises(ValidationError, match="iq4_nl fixes group_size at 32"):
        RTN(codebook="iq4_nl", group_size=64)
    with pytest.raises(ValidationError, match="static_groups"):
        GPTQ(codebook="iq4_nl", static_groups=False)


def assert_llamacpp_matches(model, tokenizer, cfg, qtype: str, path: Path) -> None:
    """Quantize `model` with `cfg`, export it as `qtype` to `path` (strict): llama.cpp's logits
    are our quantized model's, far closer to them than to the float model's."""
    from tinyllm.export import llamacpp

    ids = tokenizer("Pack my box with five dozen liquor jugs.")["input_ids"][:24]
    with torch.no_grad():
        float_logits = model(torch.tensor([ids])).logits[0].numpy()
    quantize(model, cfg)
    export(model, tokenizer, path, "gguf", qtype, embed_type="f32", strict=True)
    theirs = llamacpp.logits(llamacpp.open_gguf(path, n_ctx=64), ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(theirs - ours).max()
    assert err < 0.02 * np.abs(ours).max()
    assert err < 0.5 * np.abs(theirs - float_logits).max()


def test_llamacpp_runs_iq4nl_file(tokenizer, tmp_path: Path) -> None:
    """llama.cpp's IQ4_NL kernels on our blocks give our quantized model's logits."""
    pytest.importorskip("llama_cpp")
    model = _model(len(tokenizer))
    assert_llamacpp_matches(
        model, tokenizer, RTN(codebook="iq4_nl"), "iq4_nl", tmp_path / "nl.gguf"
    )
