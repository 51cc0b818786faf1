"""IQ4_XS (IQ4_NL's table in super-blocks of 256 with 6-bit block scales): the grid, bit-exact
carry into GGUF (gguf's decoder reads our blocks back), GPTQ on it with IQ4_NL's fallback for
rows that are not whole super-blocks, --type auto, and llama.cpp running the file."""

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
from tinyllm.export.gguf_blocks import carry_iq4xs, why_not_iq4xs
from tinyllm.kernels.iq4grid import fit_iq4nl, fit_iq4xs, iq4xs_superblocks
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.quant.api import quantize
from tinyllm.quant.common import gguf_bpw
from tinyllm.quant.gptq import GPTQ
from tinyllm.quant.rtn import RTN


def test_superblock_grid_carries_bit_for_bit_at_4_25_bits() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 512) * 0.02
    w[5, :256] = 0.0  # an all-zero super-block
    w[6, 32:64] = 0.0  # an all-zero block
    qw = QuantizedWeight.from_iq4nl(*fit_iq4xs(w))
    d, k = iq4xs_superblocks(qw.scale.reshape(64, -1))
    assert d.shape == (64, 2) and k.shape == (64, 2, 8)
    assert k.min() >= -32 and k.max() <= 31 and (k == -32).any(-1).logical_or(d == 0).all()
    assert why_not_iq4xs(qw) is None
    blocks = carry_iq4xs(qw)
    assert blocks.shape == (64, 2 * 136)  # 136 bytes per 256 weights
    assert 8 * blocks.shape[1] / 512 == gguf_bpw("iq4_xs") == 4.25
    theirs = gq.dequantize(blocks, T.IQ4_XS).reshape(64, 512)
    assert np.array_equal(theirs, qw.dequantize().numpy())
    assert torch.equal(qw.dequantize()[5, :256], torch.zeros(256))
    nl = QuantizedWeight.from_iq4nl(*fit_iq4nl(w))
    err_xs, err_nl = (qw.dequantize() - w).pow(2).sum(), (nl.dequantize() - w).pow(2).sum()
    assert err_nl <= err_xs < 1.1 * err_nl  # 6-bit scales cost little
    assert why_not_iq4xs(nl) is not None  # free float16 scales are not on the grid


def test_gptq_iq4xs_exports_strictly_with_the_iq4nl_fallback(tokenizer, tmp_path: Path) -> None:
    """Hidden 64 (q/k/v/o/gate/up rows of 64: IQ4_NL's grid, llama.cpp's fallback), FFN 256
    (down_proj rows are one super-block: IQ4_XS)."""
    model = _model(len(tokenizer))
    quantize(model, GPTQ(codebook="iq4_xs"), calib=torch.randint(0, len(tokenizer), (8, 32)))
    down = model.model.layers[0].mlp.down_proj.qweight
    assert why_not_iq4xs(down) is None
    assert "super-blocks" in why_not_iq4xs(model.model.layers[0].mlp.up_proj.qweight)
    save_checkpoint(model, tokenizer, tmp_path / "q", {})
    back, _ = tinyllm.load(tmp_path / "q")  # exact float32 scales survive the checkpoint
    assert torch.equal(back.model.layers[0].mlp.down_proj.qweight.scale, down.scale)
    parts = down.split_rows([16, 48])
    assert all(why_not_iq4xs(p) is None for p in parts)
    for kind in ("iq4_xs", "auto"):
        report = export(back, tokenizer, tmp_path / f"{kind}.gguf", "gguf", kind, strict=True)
        assert len(report.carried) == 14 and not report.requantized
        types = {t.name: t.tensor_type for t in GGUFReader(str(tmp_path / f"{kind}.gguf")).tensors}
        assert types["blk.0.ffn_down.weight"] == T.IQ4_XS
        assert types["blk.0.ffn_up.weight"] == types["blk.1.attn_q.weight"] == T.IQ4_NL


def test_strict_export_refuses_an_iq4nl_grid_as_iq4xs(tokenizer, tmp_path: Path) -> None:
    from tinyllm.errors import ConfigError

    model = _model(len(tokenizer))
    quantize(model, RTN(codebook="iq4_nl"))
    with pytest.raises(ConfigError, match="6-bit grid"):
        export(model, tokenizer, tmp_path / "x.gguf", "gguf", "iq4_xs", strict=True)


def test_llamacpp_runs_iq4xs_file(tokenizer, tmp_path: Path) -> None:
    """llama.cpp's IQ4_XS kernels on our super-blocks give our quantized model's logits
    (hidden 256, FFN 512: every row whole super-blocks)."""
    pytest.importorskip("llama_cpp")
    from tests.export.test_gguf_iq4nl import assert_llamacpp_matches

    model = _model(len(tokenizer), hidden=256, ffn=512)
    path = tmp_path / "xs.gguf"
    assert_llamacpp_matches(model, tokenizer, RTN(codebook="iq4_xs"), "iq4_xs", path)
    types = {t.tensor_type for t in GGUFReader(str(path)).tensors if t.name.startswith("blk.")}
    assert T.IQ4_XS in types and T.IQ4_NL not in types
