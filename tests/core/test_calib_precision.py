"""Calibration precision: bf16 block forwards under autocast, fp32 Hessians, the plumbing."""

import pytest
import torch

from tests.conftest import tiny_model
from tinyllm.core.calib import block_inputs
from tinyllm.core.kernels import (
    block_compute,
    calib_dtype,
    calibration_precision,
    native_bf16,
    resolve_calib_dtype,
)
from tinyllm.errors import ConfigError
from tinyllm.quant.api import quantize
from tinyllm.quant.gptq import GPTQ, HessianAccumulator, gram


def test_resolve():
    assert resolve_calib_dtype("float32") == torch.float32
    assert resolve_calib_dtype("bfloat16") == torch.bfloat16
    auto = resolve_calib_dtype("auto")
    assert auto == (torch.bfloat16 if native_bf16() else torch.float32)
    with pytest.raises(ValueError, match="auto"):
        resolve_calib_dtype("float8")


def test_precision_is_scoped():
    assert calib_dtype() == torch.float32
    with calibration_precision(torch.bfloat16):
        assert calib_dtype() == torch.bfloat16
    assert calib_dtype() == torch.float32


def test_gram_is_fp32_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 96, generator=g) * torch.logspace(0, 3, 96)  # outlier channels
    with calibration_precision(torch.bfloat16):  # the setting never reaches Hessians
        got = gram(x)
    ref = x.double().t() @ x.double()
    assert ((got.double() - ref).norm() / ref.norm()) < 1e-5  # bf16 products: ~1e-3


def test_hessian_accumulator_is_fp32_exact_and_symmetric():
    """The accumulator multiplies only the upper row blocks of x^T x (on and above the diagonal)
    and mirrors them: the result is the full, symmetric running mean (2/n) sum x x^T, in fp32
    even when the hooks run under bf16 autocast, for widths that split into uneven blocks."""
    g = torch.Generator().manual_seed(0)
    for width in (96, 576, 700):
        xs = [torch.randn(n, width, generator=g) * torch.logspace(0, 3, width) for n in (300, 500)]
        acc = HessianAccumulator()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for x in xs:
                acc.add("layer", x)
        x = torch.cat(xs).double()
        ref = 2 * x.t() @ x / x.shape[0]
        H = acc.hessian("layer").double()
        assert torch.equal(H, H.t())
        assert ((H - ref).norm() / ref.norm()) < 1e-5
        acc.add("layer", xs[0])  # adding after reading works on the upper triangle again
        x = torch.cat([*xs, xs[0]]).double()
        ref = 2 * x.t() @ x / x.shape[0]
        assert ((acc.hessian("layer").double() - ref).norm() / ref.norm()) < 1e-5


def test_bf16_block_forward_is_close_and_keeps_fp32_stream():
    model = tiny_model()
    ids = torch.randint(0, 320, (2, 32))
    inputs, kwargs = block_inputs(model, [ids])
    block, x = model.model.layers[0], inputs[0][0]
    with torch.no_grad(), block_compute(block, 64):
        ref = block(x, **kwargs[0])
    ref = ref[0] if isinstance(ref, tuple) else ref
    with torch.no_grad(), calibration_precision(torch.bfloat16), block_compute(block, 64):
        got = block(x, **kwargs[0])
    got = got[0] if isinstance(got, tuple) else got
    assert got.dtype == torch.float32  # residual stream stays fp32
    rel = (got - ref).norm() / (ref - x).norm()  # against the block's update
    assert 0 < rel < 0.03


def test_quantize_records_the_dtype_and_refuses_unknown():
    calib = torch.randint(0, 320, (4, 32))
    for name, want in (("float32", "float32"), ("bfloat16", "bfloat16")):
        report = quantize(tiny_model(), GPTQ(bits=4, group_size=32), calib, 2, calib_dtype=name)
        assert report["calib_dtype"] == want
    with pytest.raises(ConfigError, match="calibration dtype"):
        quantize(tiny_model(), GPTQ(bits=4, group_size=32), calib, 2, calib_dtype="fp8")
