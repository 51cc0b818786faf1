"""INT8 weights and activations (W8A8), dynamic or static.

Weights: symmetric 8-bit, one scale per output channel. Activations:
- `Int8Dynamic`: one scale per token, computed from the token at run time; no calibration.
- `Int8Static`: scales (and zero points when asymmetric) fixed from calibration by an observer
  (minmax, percentile, mse), per tensor or per channel (a per-channel scale is folded into the
  weight's columns, so the GEMM stays integer).
Each linear becomes an `ActQuantLinear` whose matmul is an int8 x int8 -> int32 GEMM
(`torch._int_mm`) with the rescale applied after it. Static layers are swapped in before the
block's outputs are computed, so every block calibrates on the quantized model's activations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import field_validator
from torch import nn

from tinyllm.core.calib import calibrate_blocks
from tinyllm.core.stats import collect_stats, record_outliers
from tinyllm.core.steps import Context, Step, register
from tinyllm.kernels.actquant import (
    ActivationQuant,
    ActStats,
    check_static_calibration,
    observe,
)
from tinyllm.kernels.qlinear import replace_act_linear
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.models.anatomy import LinearSite
from tinyllm.quant.common import relative_weight_error, sites_by_block, target_linears
from tinyllm.quant.rtn import RTN, rtn_quantize
from tinyllm.util import dist

W8 = RTN(bits=8, group_size=-1, sym=True)


class Int8Dynamic(Step):
    """W8A8 with per-token activation scales computed at run time."""


class StaticActivations(Step):
    """Fields of every step that fixes activation ranges from calibration."""

    calibrated = True
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    granularity: Literal["tensor", "channel"] = "tensor"
    percentile: float = 99.99
    act_sym: bool = True  # symmetric activation grid (no zero point)

    @field_validator("percentile")
    @classmethod
    def _pct(cls, v: float) -> float:
        if not 50 < v <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {v}")
        return v


class Int8Static(StaticActivations):
    """W8A8 with activation ranges fixed from calibration."""


def int8_weight(w: torch.Tensor) -> QuantizedWeight:
    """[out, in] float -> symmetric 8-bit per-output-channel record."""
    return rtn_quantize(w, W8)


def quantize_layer(
    model: nn.Module, site: LinearSite, act: ActivationQuant, errors: dict[str, float]
) -> None:
    """Swap one float linear for a W8A8 layer with input spec `act`."""
    w = site.module.weight.detach().float()
    folded = w * act.scale if act.granularity == "channel" else w  # [out, in]
    qw = int8_weight(folded)
    errors[site.name] = relative_weight_error(folded, qw)
    replace_act_linear(model, site.name, qw, act)


@register(Int8Dynamic)
def apply_dynamic(model: nn.Module, cfg: Int8Dynamic, ctx: Context) -> None:
    errors = ctx.report.setdefault("layer_errors", {})
    for site in target_linears(model):
        quantize_layer(model, site, ActivationQuant("int8", "token"), errors)
    ctx.report["activations"] = "int8 dynamic per-token"


def static_specs(
    stats: dict[str, ActStats], cfg: StaticActivations, dtype: str = "int8"
) -> dict[str, ActivationQuant]:
    """Observer over each layer's statistics -> its static ActivationQuant."""
    out = {}
    for name, st in stats.items():
        kept = sum(k.shape[0] for k in st.kept)
        check_static_calibration(st.tokens, kept, cfg.observer, cfg.granularity, cfg.percentile)
        out[name] = observe(st, cfg.observer, cfg.granularity, cfg.act_sym, dtype, cfg.percentile)
    return out


def check_data_parallel(cfg: StaticActivations) -> None:
    """Under several processes only the minmax observer is exact (extremes reduce by min/max
    over the ranks; the percentile and MSE observers read a per-process token subsample)."""
    if cfg.observer != "minmax":
        dist.refuse(
            f"the {cfg.observer} activation observer",
            "it reads a token subsample that each process draws from its own batches",
            "use --observer minmax",
        )


def static_block_fn(
    model: nn.Module,
    ctx: Context,
    cfg: StaticActivations,
    quantize: Callable[[nn.Module, LinearSite, ActivationQuant, dict], None],
    dtype: str = "int8",
):
    """calibrate_blocks callback: observe a block's inputs, then swap in the quantized layers."""
    check_data_parallel(cfg)
    by_block = sites_by_block(model, -1)
    errors = ctx.report.setdefault("layer_errors", {})

    def fn(i: int, block: nn.Module, xs: list, kwargs: dict) -> None:
        sites = by_block.pop(i, [])
        stats = collect_stats(block, xs, kwargs, [s.local for s in sites])
        record_outliers(ctx, sites, stats)
        specs = static_specs(stats, cfg, dtype)
        for s in sites:
            quantize(model, s, specs[s.local], errors)

    return fn


@register(Int8Static)
def apply_static(model: nn.Module, cfg: Int8Static, ctx: Context) -> None:
    fn = static_block_fn(model, ctx, cfg, quantize_layer)
    calibrate_blocks(model, ctx.calib, ctx.batch_size, fn, "INT8 static")
    ctx.report["activations"] = f"int8 static per-{cfg.granularity} ({cfg.observer})"
