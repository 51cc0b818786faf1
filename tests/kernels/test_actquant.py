"""Activation quantization: observers, the W8A8/FP8 layer, INT8 static/dynamic, SmoothQuant, FP8."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import tinyllm
from tests.conftest import tiny_model
from tinyllm.checkpoint import save_checkpoint
from tinyllm.errors import ArchitectureError, ConfigError
from tinyllm.kernels.actquant import (
    ActivationQuant,
    ActStats,
    fp8_round,
    int8_qparams,
    mse_range,
    observe,
    percentile_range,
    static_spec,
)
from tinyllm.kernels.qlinear import ActQuantLinear
from tinyllm.quant.api import quantize
from tinyllm.quant.awq import fold_scale
from tinyllm.quant.fp8 import FP8, fp8_quantize
from tinyllm.quant.int8 import Int8Dynamic, Int8Static, int8_weight
from tinyllm.quant.outliers import outlier_report
from tinyllm.quant.smoothquant import SmoothQuant, smooth_factor


def _stats(x: torch.Tensor) -> ActStats:
    st = ActStats()
    st.add(x)
    return st


def test_dynamic_int8_error_is_half_a_step_per_token():
    x = torch.randn(16, 64) * torch.linspace(0.1, 10, 16)[:, None]
    spec = ActivationQuant("int8", "token")
    step = x.abs().amax(dim=1, keepdim=True) / 127
    assert ((spec.fake(x) - x).abs() <= step / 2 + 1e-6).all()


def test_asymmetric_grid_covers_the_range_with_integer_zero():
    lo, hi = torch.tensor([-1.0]), torch.tensor([3.0])
    scale, zero = int8_qparams(lo, hi, sym=False)
    assert zero.dtype == torch.int32
    x = torch.linspace(-1, 3, 1000)[:, None]
    spec = ActivationQuant("int8", "tensor", scale, zero)
    assert (spec.fake(x) - x).abs().max() <= scale / 2 + 1e-6


def test_observers_percentile_and_mse_clip_a_planted_outlier():
    x = torch.randn(4096, 8)
    x[8, 3] = 500.0  # in the MSE search's strided subsample (every 2nd of 4096 tokens)
    st = _stats(x)
    mm = observe(st, "minmax", "tensor", True)
    pc = observe(st, "percentile", "tensor", True, percentile=99.9)
    ms = observe(st, "mse", "tensor", True)
    assert float(mm.scale) == pytest.approx(500 / 127)
    assert float(pc.scale) < float(mm.scale) / 50  # the outlier is one value in 32768
    assert float(ms.scale) < float(mm.scale)
    err = {k: (s.fake(x) - x).pow(2).sum() for k, s in {"mm": mm, "ms": ms}.items()}
    assert err["ms"] < err["mm"]
    lo, hi = percentile_range(x, 100.0, per_channel=True)
    assert torch.equal(hi, x.amax(dim=0)) and torch.equal(lo, x.amin(dim=0))


def test_mse_range_per_channel_never_worse_than_minmax():
    x = torch.randn(2048, 16) ** 3
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    lo2, hi2 = mse_range(x, lo, hi, True, "int8")
    e_mm = (static_spec(lo, hi, True, "int8", "channel").fake(x) - x).pow(2).sum(dim=0)
    e_ms = (static_spec(lo2, hi2, True, "int8", "channel").fake(x) - x).pow(2).sum(dim=0)
    assert (e_ms <= e_mm + 1e-6).all()


@pytest.mark.parametrize(
    "spec",
    [
        ActivationQuant("int8", "token"),
        static_spec(torch.tensor([-3.0]), torch.tensor([4.0]), False, "int8", "tensor"),
        static_spec(-torch.rand(48) * 4, torch.rand(48) * 4, False, "int8", "channel"),
    ],
    ids=["token", "tensor-asym", "channel-asym"],
)
def test_integer_gemm_equals_fake_quant_reference(spec):
    torch.manual_seed(0)
    w, b = torch.randn(40, 48), torch.randn(40)
    x = torch.randn(2, 5, 48) * 2
    folded = w * spec.scale if spec.granularity == "channel" else w
    layer = ActQuantLinear(int8_weight(folded), spec, b)
    assert layer.kernel == "int8_mm"
    y = layer(x)
    ref = spec.fake(x.reshape(-1, 48)) @ layer.dequantized_weight().t() + b
    assert torch.allclose(y.reshape(-1, 40), ref, rtol=1e-4, atol=1e-4)
    assert y.shape == (2, 5, 40)


def test_fp8_weights_are_the_fp8_grid():
    w = torch.randn(8, 32)
    for fmt in ("fp8_e4m3", "fp8_e5m2"):
        qw = fp8_quantize(w, fmt)
        assert qw.bits == 8 and qw.codebook.numel() == 256
        scale = qw.scale.float()
        assert torch.equal(qw.dequantize(), fp8_round(w / scale, fmt) * scale)
        rel = float((qw.dequantize() - w).norm() / w.norm())
        assert rel < (0.04 if fmt == "fp8_e4m3" else 0.08)


def test_smoothing_keeps_the_float_function():
    model = tiny_model()
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    attn = model.model.layers[0].self_attn
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    s = smooth_factor(torch.rand(64) * 10, torch.rand(64), 0.5)
    fold_scale(model.model.layers[0].input_layernorm, mods, s, 0.0)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)


def _outlier_model() -> nn.Module:
    """A tiny Llama whose norms make a few input channels 30x larger (as LLMs' are)."""
    model = tiny_model()
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data[[3, 17, 40]] *= 30
    return model


def _logit_error(cfg, calib: torch.Tensor, model_fn=_outlier_model) -> float:
    model = model_fn()
    with torch.no_grad():
        ref = model(calib[:2]).logits
    quantize(model, cfg, calib=calib)
    with torch.no_grad():
        return float((model(calib[:2]).logits - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(0, 320, (16, 64), generator=torch.Generator().manual_seed(1))


def test_smoothquant_beats_naive_static_w8a8_on_outliers(calib):
    naive = _logit_error(Int8Static(), calib)
    smooth = _logit_error(SmoothQuant(), calib)
    fixed = _logit_error(SmoothQuant(alpha=0.5), calib)
    assert smooth < 0.5 * naive
    assert fixed < naive


def test_smoothquant_model_search_reports_one_alpha(calib):
    model = _outlier_model()
    rep = quantize(model, SmoothQuant(search="model", grid=5), calib=calib)
    alpha = rep["smoothquant_model_alpha"]
    assert alpha in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert set(rep["smoothquant_alpha"].values()) == {alpha}
    assert len(rep["smoothquant_alpha_errors"]) == 5
    smoothed = rep["outliers_smoothed"]["model.layers.0.self_attn.q_proj"]["ratio"]
    assert smoothed < rep["outliers"]["model.layers.0.self_attn.q_proj"]["ratio"]


@pytest.mark.parametrize(
    "cfg",
    [
        Int8Dynamic(),
        Int8Static(),
        Int8Static(granularity="channel", act_sym=False, observer="mse"),
        SmoothQuant(activations="dynamic"),
        FP8(),
        FP8(format="e5m2", activations="static"),
    ],
    ids=["dyn", "static", "channel-asym-mse", "sq-dyn", "fp8", "fp8-e5m2-static"],
)
def test_w8a8_methods_close_to_float_and_checkpoint_round_trip(cfg, calib, tmp_path, tokenizer):
    model = tiny_model(vocab=len(tokenizer))
    ids = calib[:2] % len(tokenizer)
    with torch.no_grad():
        ref = model(ids).logits
    rep = quantize(model, cfg, calib=calib % len(tokenizer))
    layers = [m for m in model.modules() if isinstance(m, ActQuantLinear)]
    assert len(layers) == 14
    with torch.no_grad():
        out = model(ids).logits
    assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 5e-3
    if isinstance(cfg, FP8):
        assert "simulated" in rep["simulated"]
        assert layers[0].kernel == "fp8_simulated"
    else:
        assert layers[0].kernel == "int8_mm"
    save_checkpoint(model, tokenizer, tmp_path / "q", {"steps": [cfg.describe()]})
    loaded, _ = tinyllm.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    assert loaded.model.layers[1].mlp.down_proj.act.describe() == layers[-1].act.describe()


def test_outlier_report_finds_planted_channels(calib):
    rep = outlier_report(_outlier_model(), calib)
    q = rep["model.layers.0.self_attn.q_proj"]
    assert set(q["top_channels"]) == {3, 17, 40}
    assert q["ratio"] > 10 and q["levels"] < 127 / 10


def test_bad_inputs(calib):
    with pytest.raises(ValidationError, match="alpha must be in"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(ValidationError, match="percentile"):
        Int8Static(percentile=30)
    with pytest.raises(ConfigError, match="at least 512"):
        quantize(tiny_model(), Int8Static(), calib=calib[:4])  # 256 tokens
    with pytest.raises(ConfigError, match="per channel needs at least"):
        cfg = Int8Static(observer="percentile", granularity="channel", percentile=99.99)
        quantize(tiny_model(), cfg, calib=calib)
    with pytest.raises(ConfigError, match="calibration"):
        quantize(tiny_model(), SmoothQuant(activations="dynamic"))
    with pytest.raises(ConfigError, match="calibration"):
        quantize(tiny_model(), FP8(activations="static"))
    assert not FP8().calibrated  # dynamic FP8 needs no windows


def test_smoothquant_names_layers_that_cannot_host_scales(calib):
    model = tiny_model("opt")
    with pytest.raises(ArchitectureError, match=r"fc1, fc2\) cannot host input scales"):
        quantize(model, SmoothQuant(), calib=calib)
    quantize(model, Int8Static(), calib=calib)  # the folding-free methods still work
    assert isinstance(model.model.decoder.layers[0].fc1, ActQuantLinear)


def test_cli_smoothquant_and_outliers(tiny_dir: Path, tmp_path: Path, corpus_file: Path):
    from tests.test_cli import assert_clean_error, run

    out = tmp_path / "sq"
    args = ["--calib-corpus", str(corpus_file), "--samples", "8", "--seq-len", "64"]
    p = run("quantize", str(tiny_dir), "--method", "smoothquant", *args, "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "int8 static per-tensor" in p.stdout
    assert (out / "quant_report.json").is_file()
    bad = run("quantize", str(tiny_dir), "--method", "smoothquant", "--alpha", "1.5", "-o", "x")
    assert_clean_error(bad, "alpha must be in")
    p = run("outliers", str(tiny_dir), *args, "--top", "3", "--json", str(tmp_path / "o.json"))
    assert p.returncode == 0, p.stderr
    assert "ratio" in p.stdout and (tmp_path / "o.json").is_file()


def test_cli_mixed_and_bad_budget(tiny_dir: Path, tmp_path: Path, corpus_file: Path):
    import json

    from tests.test_cli import assert_clean_error, run

    out = tmp_path / "mixed"
    args = ["--calib-corpus", str(corpus_file), "--samples", "4", "--seq-len", "32"]
    p = run(
        "quantize", str(tiny_dir), "--method", "mixed", "--avg-bits", "3.5", "--group-size",
        "32", *args, "-o", str(out),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "quant_report.json").read_text())
    assert set(report["bit_allocation"].values()) <= {3, 4, 8}
    assert report["avg_bits"] <= 3.5
    loaded, _ = tinyllm.load(out)
    widths = {m.qweight.bits for m in loaded.modules() if hasattr(m, "qweight")}
    assert widths == set(report["bit_allocation"].values())
    bad = run("quantize", str(tiny_dir), "--method", "mixed", "--avg-bits", "2", "-o", "x")
    assert_clean_error(bad, "below the smallest width")
