"""Calibration precision: bf16 block forwards under autocast, Hessians (fp32, or bf16 with the
largest channels exact in bf16 passes), the plumbing."""

import pytest
import torch

from tests.conftest import tiny_model
from tinyllm.core.calib import block_inputs
from tinyllm.core.hessian import (
    EXACT_ROWS,
    HessianAccumulator,
    add_gram_upper_bf16,
    gram,
    output_error,
)
from tinyllm.core.kernels import (
    block_compute,
    calib_dtype,
    calibration_precision,
    native_bf16,
    resolve_calib_dtype,
)
from tinyllm.errors import ConfigError
from tinyllm.quant.api import quantize
from tinyllm.quant.gptq import GPTQ, gptq_quantize


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


def _outlier_inputs(g: torch.Generator, tokens: int, width: int) -> torch.Tensor:
    """Correlated inputs with a few channels 30-300x larger, as in an LLM's residual stream
    (the same channels in every token: the accumulator picks its exact rows from a first batch)."""
    mix = torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width)
    x = torch.randn(tokens, width, generator=g) @ mix
    big = torch.randperm(width, generator=g)[:6]
    x[:, big] *= torch.tensor([300.0, 200.0, 100.0, 60.0, 40.0, 30.0])
    return x


def test_bf16_hessian_keeps_the_largest_channels_exact():
    """In bf16 passes the accumulator multiplies in bf16 but keeps the largest channels' rows and
    columns exact: within 1% of the mean diagonal of the fp32 Hessian (GPTQ's dampening), while
    plain bf16 products miss by more on the same inputs; GPTQ's output error is unchanged."""
    g = torch.Generator().manual_seed(0)
    for width in (96, 576):
        xs = list(_outlier_inputs(g, 3072, width).split([2048, 1024]))  # same outliers
        acc = HessianAccumulator()
        with calibration_precision(torch.bfloat16), torch.autocast("cpu", dtype=torch.bfloat16):
            for x in xs:
                acc.add("layer", x)
        H = acc.hessian("layer")
        x = torch.cat(xs).double()
        ref = (2 * x.t() @ x / x.shape[0]).float()
        mean_diag = float(ref.diagonal().mean())
        assert torch.equal(H, H.t())
        assert float((H - ref).abs().max()) < 0.01 * mean_diag
        top = torch.topk(xs[0].pow(2).sum(0), min(EXACT_ROWS, width)).indices
        assert torch.allclose(H[top], ref[top], rtol=1e-5, atol=1e-6 * mean_diag)
        plain = torch.zeros(width, width)
        for x in xs:
            add_gram_upper_bf16(plain, x, 1.0, 2.0 / 3072)
        plain = plain.triu() + plain.triu(1).t()
        assert float((plain - ref).abs().max()) > 0.01 * mean_diag
        W = torch.randn(64, width, generator=g)
        cfg = GPTQ(bits=4, group_size=32)
        errors = [output_error(W, gptq_quantize(W, h, cfg)[0].dequantize(), ref) for h in (ref, H)]
        assert abs(errors[1] / errors[0] - 1) < 0.02


def test_bf16_hessian_only_in_bf16_passes():
    g = torch.Generator().manual_seed(1)
    x = _outlier_inputs(g, 512, 96)
    acc = HessianAccumulator()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast alone is not the setting
        acc.add("layer", x)
    assert not acc.exact
    ref = 2 * x.double().t() @ x.double() / 512
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
