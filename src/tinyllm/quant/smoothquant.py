"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights, then W8A8.

For each scaling group (an op whose output feeds some linears: norm -> q/k/v, norm -> gate/up,
v -> o, up -> down; the same family table as AWQ, checked on the live graph) the per-input-channel
factor s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) divides the producing op's output and multiplies
the consumers' weight columns, so the float model computes the same function while the inputs the
linears see have flatter channels. alpha is given, or searched per layer (each group takes the
alpha whose W8A8 output error on a calibration subsample is smallest) or per model (one alpha
minimising the summed relative error of all groups, from a first pass over the float model).
Then every linear becomes W8A8 with static (observer, per tensor or channel) or dynamic
(per token) activations, exactly as `int8-static` / `int8-dynamic` do.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import field_validator
from torch import nn

from tinyllm.core.calib import calibrate_blocks
from tinyllm.core.stats import collect_stats, record_outliers
from tinyllm.core.steps import Context, register
from tinyllm.errors import ArchitectureError
from tinyllm.kernels.actquant import ActivationQuant, ActStats
from tinyllm.kernels.primitives import fake_quant, group_qparams
from tinyllm.models.families import family_of
from tinyllm.quant.awq import checked_groups, fold_scale
from tinyllm.quant.common import sites_by_block
from tinyllm.quant.int8 import (
    StaticActivations,
    check_data_parallel,
    quantize_layer,
    static_specs,
)
from tinyllm.util import dist

log = logging.getLogger(__name__)
SEARCH_TOKENS = 1024  # calibration tokens behind each alpha's error estimate


class SmoothQuant(StaticActivations):
    alpha: float | None = None  # migration strength; None: searched
    search: Literal["layer", "model"] = "layer"  # how alpha is searched when not given
    grid: int = 11  # alpha candidates 0, 1/(grid-1), ..., 1
    activations: Literal["static", "dynamic"] = "static"

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v <= 1:
            raise ValueError(f"alpha must be in [0, 1] (0: no migration, 1: all of it), got {v}")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"grid must be at least 2 alpha candidates, got {v}")
        return v


def smooth_factor(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) for x_max, w_max [in]. -> s [in]"""
    s = x_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


def w8a8_error(
    x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, dynamic: bool, x_max: torch.Tensor
) -> float:
    """Relative output error of W8A8 after smoothing by s, on a token sample x [tokens, in] with
    w [out, in]. A static grid is the per-tensor minmax one the layer will get: its scale comes
    from x_max [in], the extremes over *every* calibration token (the rare huge ones included),
    not from the sample."""
    xs, ws = x / s, w * s
    if dynamic:
        xq = ActivationQuant("int8", "token").fake(xs)
    else:
        a = (x_max / s).max().clamp_min(1e-8) / 127
        xq = (xs / a).round().clamp(-127, 127) * a
    sc, z = group_qparams(ws, 8, -1, True)
    wq = fake_quant(ws, sc, z, 8)
    ref = x @ w.t()
    return float((xq @ wq.t() - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-12))


def alpha_errors(
    x: torch.Tensor, weights: list[torch.Tensor], x_max: torch.Tensor, grid: int, dynamic: bool
) -> torch.Tensor:
    """W8A8 relative error of one group for each alpha candidate. -> [grid]"""
    w = torch.cat(weights).float()  # [sum(out), in]
    w_max = w.abs().amax(dim=0)
    alphas = torch.linspace(0, 1, grid).tolist()
    errs = [w8a8_error(x, w, smooth_factor(x_max, w_max, a), dynamic, x_max) for a in alphas]
    return torch.tensor(errs)


def _search_sample(st: ActStats) -> torch.Tensor:
    sample = st.sample()
    return sample[:: max(1, sample.shape[0] // SEARCH_TOKENS)]


def _block_groups(
    model: nn.Module, block: nn.Module, xs: list, kwargs: dict, i: int, sites: list
) -> list[tuple[str, list[str]]]:
    groups = checked_groups(model, block, xs[0], kwargs, i)
    if not groups:
        names = ", ".join(s.local for s in sites)
        raise ArchitectureError(
            f"SmoothQuant: the linears of block {i} ({names}) cannot host input scales: tinyllm "
            f"knows no norm or linear of model type {model.config.model_type!r} that feeds them "
            "directly and could absorb 1/s (models/families.py, scaling); use int8-static or "
            "int8-dynamic, which need no folding"
        )
    return groups


@register(SmoothQuant)
def apply(model: nn.Module, cfg: SmoothQuant, ctx: Context) -> None:
    by_block = sites_by_block(model, -1)
    dynamic = cfg.activations == "dynamic"
    if not dynamic:
        check_data_parallel(cfg)
    if cfg.alpha is None:
        dist.refuse(
            "SmoothQuant's alpha search",
            "it measures errors on a token subsample that each process draws from its own batches",
            "give --alpha",
        )
    alpha = cfg.alpha
    if alpha is None and cfg.search == "model":
        alpha = _model_alpha(model, ctx, cfg, by_block)
    offset = family_of(model).norm_offset
    errors = ctx.report.setdefault("layer_errors", {})
    chosen = ctx.report.setdefault("smoothquant_alpha", {})
    unsmoothed = ctx.report.setdefault("unsmoothed", [])

    def fn(i: int, block: nn.Module, xs: list, kwargs: dict) -> None:
        sites = by_block.pop(i, [])
        stats = collect_stats(block, xs, kwargs, [s.local for s in sites])
        record_outliers(ctx, sites, stats)
        grouped = set()
        for prev, consumers in _block_groups(model, block, xs, kwargs, i, sites):
            mods = [block.get_submodule(c) for c in consumers]
            st = stats[consumers[0]]
            x_max = torch.maximum(st.lo.abs(), st.hi.abs())
            a = alpha
            if a is None:
                errs = alpha_errors(
                    _search_sample(st), [m.weight for m in mods], x_max, cfg.grid, dynamic
                )
                a = float(torch.linspace(0, 1, cfg.grid)[int(errs.argmin())])
            w_max = torch.cat([m.weight.detach() for m in mods]).abs().amax(dim=0)
            s = smooth_factor(x_max, w_max, a)
            fold_scale(block.get_submodule(prev), mods, s, offset)
            chosen[f"{i}.{prev}"] = a
            for c in consumers:
                stats[c] = stats[c].scaled(s)
                grouped.add(c)
        unsmoothed.extend(s.name for s in sites if s.local not in grouped)
        record_outliers(ctx, sites, stats, "outliers_smoothed")
        specs = (
            {n: ActivationQuant("int8", "token") for n in stats}
            if dynamic
            else static_specs(stats, cfg)
        )
        for site in sites:
            quantize_layer(model, site, specs[site.local], errors)

    calibrate_blocks(model, ctx.calib, ctx.batch_size, fn, "SmoothQuant")
    if unsmoothed:
        log.info("SmoothQuant: %d linears unsmoothed: %s", len(unsmoothed), unsmoothed)
    kind = "dynamic per-token" if dynamic else f"static per-{cfg.granularity} ({cfg.observer})"
    ctx.report["activations"] = f"int8 {kind}"


def _model_alpha(model: nn.Module, ctx: Context, cfg: SmoothQuant, by_block: dict) -> float:
    """One alpha for the whole model: summed relative W8A8 error of every group, measured in a
    first pass over the (unchanged) float model."""
    total = torch.zeros(cfg.grid)
    dynamic = cfg.activations == "dynamic"

    def fn(i: int, block: nn.Module, xs: list, kwargs: dict) -> None:
        sites = by_block.get(i, [])
        stats = collect_stats(block, xs, kwargs, [s.local for s in sites])
        for _prev, consumers in _block_groups(model, block, xs, kwargs, i, sites):
            st = stats[consumers[0]]
            x_max = torch.maximum(st.lo.abs(), st.hi.abs())
            weights = [block.get_submodule(c).weight for c in consumers]
            total.add_(alpha_errors(_search_sample(st), weights, x_max, cfg.grid, dynamic))

    calibrate_blocks(model, ctx.calib, ctx.batch_size, fn, "SmoothQuant alpha search")
    alpha = float(torch.linspace(0, 1, cfg.grid)[int(total.argmin())])
    ctx.report["smoothquant_model_alpha"] = alpha
    alphas = [round(a, 3) for a in torch.linspace(0, 1, cfg.grid).tolist()]
    ctx.report["smoothquant_alpha_errors"] = dict(zip(alphas, total.tolist(), strict=True))
    return alpha
