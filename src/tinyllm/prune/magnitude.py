"""Magnitude pruning: remove the weights of smallest |W|, per layer, per output row, or globally
over all block linears (data-free unless the OWL allocation asks for calibration)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tinyllm.core.steps import Context, register
from tinyllm.errors import ConfigError
from tinyllm.prune.common import (
    PruneStep,
    check_pattern_fits,
    layer_mask,
    nm_mask,
    prune_sites,
    row_mask,
)
from tinyllm.prune.owl import block_sparsities


class Magnitude(PruneStep):
    scope: Literal["layer", "row", "global"] = "layer"


def magnitude_mask(w: torch.Tensor, cfg: Magnitude, sparsity: float) -> torch.Tensor:
    score = w.abs()
    if cfg.nm:
        return nm_mask(score, *cfg.nm)
    return row_mask(score, sparsity) if cfg.scope == "row" else layer_mask(score, sparsity)


@register(Magnitude)
def apply(model: nn.Module, cfg: Magnitude, ctx: Context) -> None:
    sites = prune_sites(model)
    check_pattern_fits(sites, cfg)
    if cfg.scope == "global" and (cfg.nm or cfg.allocation == "owl"):
        raise ConfigError("magnitude scope global sets one threshold; it takes no pattern or OWL")
    per_block = block_sparsities(model, cfg, ctx, len({s.block for s in sites}))
    report = ctx.report.setdefault("layer_sparsity", {})
    if cfg.scope == "global":
        scores = torch.cat([s.module.weight.detach().abs().reshape(-1) for s in sites])
        k = int(scores.numel() * cfg.sparsity)
        threshold = scores.kthvalue(k).values if k else scores.min() - 1
    with torch.no_grad():
        for s in sites:
            w = s.module.weight
            if cfg.scope == "global":
                mask = w.abs() > threshold
            else:
                mask = magnitude_mask(w.detach(), cfg, per_block[s.block])
            w.mul_(mask)
            report[s.name] = 1 - float(mask.float().mean())
