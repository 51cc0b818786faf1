"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, compared within each output row, block by
block on calibration inputs (each block sees the previous blocks already pruned)."""

from __future__ import annotations

import torch
from torch import nn

from tinyllm.core.calib import calibrate_blocks, observe_block
from tinyllm.core.steps import Context, register
from tinyllm.prune.common import PruneStep, mask_from_score
from tinyllm.prune.owl import ColumnNorms, pruning_plan, wanda_score


class Wanda(PruneStep):
    calibrated = True


@register(Wanda)
def apply(model: nn.Module, cfg: Wanda, ctx: Context) -> None:
    groups, per_block = pruning_plan(model, cfg, ctx)
    report = ctx.report.setdefault("layer_sparsity", {})

    def prune_block(i: int, block: nn.Module, xs: list, kwargs: dict):
        norms = ColumnNorms()
        observe_block(block, xs, kwargs, [s.local for s in groups[i]], norms.add)
        for s in groups[i]:
            w = s.module.weight
            mask = mask_from_score(wanda_score(w.detach(), norms.norm(s.local)), cfg, per_block[i])
            with torch.no_grad():
                w.mul_(mask)
            report[s.name] = 1 - float(mask.float().mean())

    calibrate_blocks(model, ctx.calib, ctx.batch_size, prune_block, "Wanda")
