import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from tinyllm.export.gguf_blocks import (
    CARRIABLE,
    K_TYPES,
    carry,
    carry_k,
    permute_rows,
    why_not_carried,
)
from tinyllm.kernels.kgrid import KSPECS, derive, fit_kgrid, quantize_on
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.quant.common import gguf_grid
from tinyllm.quant.nf4 import NF4, nf4_quantize
from tinyllm.quant.rtn import RTN, rtn_quantize

GRIDS = {T.Q4_0: (4, True), T.Q4_1: (4, False), T.Q5_0: (5, True), T.Q5_1: (5, False)}
GRIDS[T.Q8_0] = (8, True)


@pytest.mark.parametrize("qtype", list(GRIDS))
@pytest.mark.parametrize("group", [32, 64, -1])
def test_carried_blocks_decode_to_our_weights(qtype, group):
    """gguf's own decoder reads our blocks back as exactly our dequantized weights."""
    torch.manual_seed(0)
    bits, sym = GRIDS[qtype]
    qw = rtn_quantize(torch.randn(6, 128), RTN(bits=bits, group_size=group, sym=sym))
    blocks = carry(qw, qtype)
    assert blocks.shape == (6, 128 // 32 * gq.GGML_QUANT_SIZES[qtype][1])
    decoded = torch.from_numpy(gq.dequantize(blocks, qtype)).reshape(6, 128)
    ours = qw.dequantize()
    if qtype in (T.Q4_1, T.Q5_1):  # the min term m = -scale * zero is rounded to float16
        step = qw.scale.float().abs().max()
        assert (decoded - ours).abs().max() <= 0.01 * step
    else:
        torch.testing.assert_close(decoded, ours, rtol=0, atol=0)


def test_reasons_for_not_carrying():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    assert "3-bit" in why_not_carried(rtn_quantize(w, RTN(bits=3, group_size=32)), T.Q4_0)
    assert "asymmetric" in why_not_carried(rtn_quantize(w, RTN(bits=4, group_size=32)), T.Q4_0)
    assert why_not_carried(rtn_quantize(w, RTN(bits=4, group_size=32)), T.Q4_1) is None
    assert "codebook" in why_not_carried(nf4_quantize(w, NF4(block_size=64)), T.Q4_0)
    qw = rtn_quantize(w, RTN(bits=4, group_size=32, sym=True))
    qw.perm = torch.randperm(64)
    assert "permuted" in why_not_carried(qw, T.Q4_0)
    with pytest.raises(ValueError):
        carry(qw, T.Q4_0)


def test_permute_rows_interleaves_rotary_halves():
    rows = np.arange(8)[:, None] * np.ones((1, 3))  # 2 heads of 4 rows
    out = permute_rows(rows, n_head=2)[:, 0].tolist()
    assert out == [0, 2, 1, 3, 4, 6, 5, 7]
    t = torch.arange(8.0)[:, None].repeat(1, 3)
    assert permute_rows(t, 2)[:, 0].tolist() == out


def test_gguf_grid_of_each_carriable_type():
    """The grid --gguf-compatible puts a layer on is the one the export carries exactly."""
    for qtype, (bits, sym, _) in CARRIABLE.items():
        grid = gguf_grid(qtype.name.lower())
        assert (grid["bits"], grid["group_size"], grid["sym"]) == (bits, 32, sym)
    with pytest.raises(ValueError, match="q8_0"):
        gguf_grid("q9_0")


@pytest.mark.parametrize("qtype", list(K_TYPES))
def test_k_quant_blocks_dequantize_as_gguf_does(qtype) -> None:
    """Every code, scale and min carried bit for bit: gguf-py's dequantization of our blocks
    equals our record's, exactly."""
    torch.manual_seed(1)
    w = torch.randn(4, 512) * 0.03
    w[0, :48] = 0
    w[1] = w[1].abs()
    spec = KSPECS[K_TYPES[qtype]]
    sb = fit_kgrid(w, spec)
    scale, offset = derive(sb, spec)
    qw = QuantizedWeight.from_kquant(quantize_on(w, scale, offset, spec), spec.name, sb)
    data = carry_k(qw, qtype)
    block, size = gq.GGML_QUANT_SIZES[qtype]
    assert data.shape == (4, 512 // block * size)
    assert np.array_equal(gq.dequantize(data, qtype), qw.dequantize().numpy())


def test_k_quant_refuses_other_records() -> None:
    qw = QuantizedWeight.from_codes(
        torch.zeros(2, 256, dtype=torch.uint8),
        torch.ones(2, 8),
        torch.zeros(2, 8),
        bits=4,
        group_size=32,
        sym=False,
    )
    with pytest.raises(ValueError, match="--gguf-compatible"):
        carry_k(qw, T.Q4_K)
