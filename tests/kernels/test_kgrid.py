"""K-quant grids: super-block structure, search quality, records and their storage."""

from __future__ import annotations

import pytest
import torch

from tinyllm.kernels.kgrid import KSPECS, SUPER, derive, fit_kgrid, quantize_on, working_grid
from tinyllm.kernels.primitives import group_qparams, quantize_codes
from tinyllm.kernels.qweight import QuantizedWeight


def _weight(rows: int = 6, cols: int = 512) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * 0.05
    w[0, :40] = 0  # an all-zero sub-block
    w[1] = w[1].abs()  # all positive: no min
    return w


def _record(w: torch.Tensor, name: str, importance=None) -> QuantizedWeight:
    spec = KSPECS[name]
    sb = fit_kgrid(w, spec, importance)
    scale, offset = derive(sb, spec)
    return QuantizedWeight.from_kquant(quantize_on(w, scale, offset, spec), name, sb)


@pytest.mark.parametrize("name", list(KSPECS))
def test_parameters_fit_their_integer_ranges(name: str) -> None:
    spec = KSPECS[name]
    sb = fit_kgrid(_weight(), spec)
    lo, hi = spec.sc_range
    assert sb["d"].dtype == torch.float16 and sb["d"].shape == (6, 512 // SUPER)
    assert sb["sc"].shape == (6, 512 // spec.sub)
    assert int(sb["sc"].min()) >= lo and int(sb["sc"].max()) <= hi
    if not spec.signed:
        assert int(sb["mn"].min()) >= 0 and int(sb["mn"].max()) <= hi
        assert float(sb["dmin"].float().min()) >= 0


@pytest.mark.parametrize("name", list(KSPECS))
def test_all_zero_sub_block_dequantizes_to_zero(name: str) -> None:
    qw = _record(_weight(), name)
    assert torch.equal(qw.dequantize()[0, :32], torch.zeros(32))


@pytest.mark.parametrize(
    ("name", "bits", "group"), [("q4_k", 4, 32), ("q5_k", 5, 32), ("q6_k", 6, 32)]
)
def test_error_close_to_a_float16_grid_of_the_same_bits(name: str, bits: int, group: int) -> None:
    """Quantized sub-block scales cost little: within 15% of RTN with float16 group scales."""
    w = _weight()[2:]
    qw = _record(w, name)
    ours = float((qw.dequantize() - w).norm() / w.norm())
    s, z = group_qparams(w, bits, group, sym=False, mse=True, norm=2.0)
    rtn = quantize_codes(w, s.half().float(), z, bits, group)
    ref = QuantizedWeight.from_codes(rtn, s, z, bits=bits, group_size=group, sym=False)
    base = float((ref.dequantize() - w).norm() / w.norm())
    assert ours < 1.15 * base, (ours, base)


def test_importance_lowers_the_weighted_error() -> None:
    w = _weight()[2:]
    imp = torch.ones(512)
    imp[::7] = 50.0  # a few columns carry most of the signal
    plain, weighted = _record(w, "q3_k"), _record(w, "q3_k", imp)

    def err(qw: QuantizedWeight) -> float:
        return float((((qw.dequantize() - w) ** 2) * imp).sum())

    assert err(weighted) < err(plain)


def test_working_grid_reproduces_the_exact_dequantization() -> None:
    """GPTQ rounds with q = round(w / s + z): its (s, z) must dequantize as the record does."""
    spec = KSPECS["q4_k"]
    w = _weight()
    sb = fit_kgrid(w, spec)
    scale, offset = derive(sb, spec)
    s, z = working_grid(scale, offset, spec)
    qw = QuantizedWeight.from_kquant(quantize_on(w, scale, offset, spec), "q4_k", sb)
    codes = qw.codes().float().reshape(6, -1, spec.sub)
    approx = ((codes - z[..., None]) * s[..., None]).reshape(w.shape)
    torch.testing.assert_close(approx, qw.dequantize(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["q2_k", "q6_k"])
def test_record_round_trips_through_tensors_and_splits(name: str) -> None:
    qw = _record(_weight(), name)
    back = QuantizedWeight.from_tensors(qw.tensors("x"), "x", qw.meta())
    assert back.kquant == name and torch.equal(back.dequantize(), qw.dequantize())
    top, bottom = qw.split_rows([2, 4])
    assert torch.equal(torch.cat([top.dequantize(), bottom.dequantize()]), qw.dequantize())
    assert qw.storage_bits() == round(qw.shape[0] * qw.shape[1] * KSPECS[name].bpw)


def test_rows_must_be_whole_super_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of the K super-block"):
        fit_kgrid(torch.randn(2, 576), KSPECS["q4_k"])
