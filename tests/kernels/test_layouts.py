"""Layout choice (first supporting layout wins, per device) and the native build's fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tinyllm.kernels import native
from tinyllm.kernels.layouts import (
    LAYOUTS,
    Dequant,
    Int4Torch,
    Int8Torch,
    Q4Native,
    Q8Native,
    Target,
    choose_layout,
    layout_named,
)
from tinyllm.kernels.qlinear import QuantLinear
from tinyllm.quant.nf4 import NF4, nf4_quantize
from tinyllm.quant.rtn import RTN, rtn_quantize


def target(device: str, native_ops: bool) -> Target:
    t = Target(torch.device(device))
    t.__dict__["native"] = native_ops  # what the cached property would have found
    return t


@pytest.mark.parametrize(
    ("quant", "native_ops", "device", "expected"),
    [
        (RTN(bits=4, group_size=64), True, "cpu", Q4Native),
        (RTN(bits=4, group_size=64), False, "cpu", Int4Torch),
        (RTN(bits=4, group_size=64), False, "cuda", Dequant),
        (RTN(bits=4, group_size=-1), False, "cpu", Dequant),  # PyTorch's int4 needs groups
        (RTN(bits=8, group_size=-1, sym=True), True, "cpu", Q8Native),
        (RTN(bits=8, group_size=-1, sym=True), False, "cpu", Int8Torch),
        (RTN(bits=8, group_size=-1, sym=True), False, "cuda", Dequant),
        (RTN(bits=8, group_size=32, sym=True), True, "cpu", Dequant),
        (RTN(bits=3, group_size=32), True, "cpu", Dequant),
    ],
)
def test_the_first_layout_that_supports_a_record_wins(quant, native_ops, device, expected):
    qw = rtn_quantize(torch.randn(96, 256), quant)
    assert type(choose_layout(qw, target(device, native_ops))) is expected


def test_codebooks_and_odd_row_counts_take_the_float_fallback():
    nf4 = nf4_quantize(torch.randn(96, 256), NF4(block_size=64))
    assert type(choose_layout(nf4, target("cpu", True))) is Dequant
    odd = rtn_quantize(torch.randn(90, 256), RTN(bits=4, group_size=64))
    assert type(choose_layout(odd, target("cpu", True))) is Dequant


def test_layout_names_are_unique_and_the_fallback_is_last():
    assert len({layout.name for layout in LAYOUTS}) == len(LAYOUTS)
    assert type(LAYOUTS[-1]) is Dequant
    assert layout_named("int4") is LAYOUTS[1]
    with pytest.raises(KeyError, match="known: q4, int4"):
        layout_named("int3")


def test_quant_linear_keeps_the_layouts_buffers_and_reads_them_each_call():
    qw = rtn_quantize(torch.randn(96, 256), RTN(bits=4, group_size=64))
    layer = QuantLinear(qw, kernel="int4")
    assert set(layer.packed()) == {"w_int4", "w_sz"}
    x = torch.randn(2, 256)
    y = layer(x)
    layer._buffers["w_sz"] = torch.zeros_like(layer.w_sz)  # scale 0: the product vanishes
    assert y.abs().max() > 0 and layer(x).abs().max() == 0


def test_missing_sources_fall_back_with_one_warning_saying_why(monkeypatch, caplog):
    monkeypatch.setattr(native, "SOURCES", [Path("/nonexistent/q4gemv.cpp")])
    assert "C++ sources missing" in native.unavailable_reason()
    with caplog.at_level(logging.WARNING, logger=native.log.name):
        assert native.q4_kernel.__wrapped__() is None  # the uncached body: no build attempted
    (record,) = caplog.records
    assert "/nonexistent/q4gemv.cpp" in record.getMessage()
    assert "using PyTorch's kernels" in record.getMessage()


def test_no_compiler_is_named_as_the_reason(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-tinyllm")
    assert "no C++ compiler 'no-such-compiler-tinyllm'" in native.unavailable_reason()


def test_sources_are_read_from_the_package_itself():
    import tinyllm.kernels

    package = Path(tinyllm.kernels.__file__).parent
    assert [s.parent for s in native.SOURCES] == [package / "csrc"] * 2
    assert all(s.is_file() for s in native.SOURCES)
