"""FP8 weights and activations (E4M3 by default, E5M2 as an option), simulated.

Weights: each output row is scaled so its absmax lands on the format's largest value, then rounded
to the nearest FP8 number; the record stores the FP8 bit patterns (8 bits per weight) with the
256-entry FP8 value table as its codebook and one scale per row. Activations: scaled per token at
run time (dynamic) or by a calibrated per-tensor scale (static), rounded to FP8.
This CPU has no FP8 GEMM (PyTorch's CPU `_scaled_mm` upcasts and was slower than fp32 here), so
the layer rounds its input to FP8 and multiplies the dequantized weight in float32: the accuracy
is FP8's, the speed is not. Outputs say "simulated".
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tinyllm.core.calib import calibrate_blocks
from tinyllm.core.steps import Context, register
from tinyllm.kernels.actquant import FP8_DTYPES, ActivationQuant, fp8_max
from tinyllm.kernels.qlinear import replace_act_linear
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.models.anatomy import LinearSite
from tinyllm.quant.common import relative_weight_error, target_linears
from tinyllm.quant.int8 import StaticActivations, static_block_fn

SIMULATED = (
    "FP8 simulated: inputs and weights rounded to FP8, matmul in float32 (no FP8 GEMM on CPU)"
)


class FP8(StaticActivations):
    format: Literal["e4m3", "e5m2"] = "e4m3"
    activations: Literal["static", "dynamic"] = "dynamic"
    granularity: Literal["tensor"] = "tensor"

    @property
    def calibrated(self) -> bool:  # only static activations need calibration windows
        return self.activations == "static"


def fp8_codebook(dtype: str) -> torch.Tensor:
    """Float value of every FP8 bit pattern (NaN and infinity patterns map to 0, never used)."""
    values = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPES[dtype]).float()
    return torch.where(values.isfinite(), values, torch.zeros_like(values))


def fp8_quantize(w: torch.Tensor, dtype: str) -> QuantizedWeight:
    """[out, in] float -> FP8 codes with one scale per output row."""
    m = fp8_max(dtype)
    scale = (w.abs().amax(dim=1, keepdim=True).clamp_min(1e-10) / m).half().float()  # [out, 1]
    codes = (w / scale).clamp(-m, m).to(FP8_DTYPES[dtype]).view(torch.uint8)
    return QuantizedWeight.from_codes(
        codes,
        scale,
        torch.zeros_like(scale),
        bits=8,
        group_size=-1,
        sym=True,
        codebook=fp8_codebook(dtype),
    )


def _layer_fn(dtype: str):
    def quantize(model: nn.Module, site: LinearSite, act: ActivationQuant, errors: dict) -> None:
        w = site.module.weight.detach().float()
        qw = fp8_quantize(w, dtype)
        errors[site.name] = relative_weight_error(w, qw)
        replace_act_linear(model, site.name, qw, act)

    return quantize


@register(FP8)
def apply(model: nn.Module, cfg: FP8, ctx: Context) -> None:
    dtype = f"fp8_{cfg.format}"
    quantize = _layer_fn(dtype)
    if cfg.activations == "dynamic":
        errors = ctx.report.setdefault("layer_errors", {})
        for site in target_linears(model):
            quantize(model, site, ActivationQuant(dtype, "token"), errors)
    else:
        fn = static_block_fn(model, ctx, cfg, quantize, dtype)
        calibrate_blocks(model, ctx.calib, ctx.batch_size, fn, "FP8 static")
    kind = "dynamic per-token" if cfg.activations == "dynamic" else f"static ({cfg.observer})"
    ctx.report["activations"] = f"{dtype} {kind}"
    ctx.report["simulated"] = SIMULATED
