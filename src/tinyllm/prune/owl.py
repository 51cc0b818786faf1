"""OWL (Yin et al. 2023): outlier-weighted layerwise sparsity.

A block's outlier ratio is the fraction of its Wanda scores |W_ij| * ||X_j|| above `threshold`
times their mean (over all its linears), measured on the dense model. Blocks with more outliers
keep more weights: sparsities are spread linearly over [target - lambda, target + lambda] by
outlier ratio and shifted so their mean is the target.
"""

from __future__ import annotations

import torch
from torch import nn

from tinyllm.core.calib import calibrate_blocks, observe_block
from tinyllm.core.steps import Context
from tinyllm.errors import ConfigError
from tinyllm.models.anatomy import LinearSite
from tinyllm.prune.common import PruneStep, by_block, check_pattern_fits, prune_sites
from tinyllm.util import dist


class ColumnNorms:
    """Running sum of squares of each input feature per layer: ||X_j||^2. Under several
    processes the first `norm` sums every rank's sums (all ranks observe the same layers)."""

    def __init__(self) -> None:
        self.sq: dict[str, torch.Tensor] = {}
        self._reduced = False

    def add(self, name: str, x: torch.Tensor) -> None:  # x: [tokens, in]
        sq = x.float().pow(2).sum(0)
        self.sq[name] = self.sq[name] + sq if name in self.sq else sq
        self._reduced = False

    def norm(self, name: str) -> torch.Tensor:
        if not self._reduced:
            for key in sorted(self.sq):
                dist.all_reduce_sum(self.sq[key])
            self._reduced = True
        return self.sq[name].sqrt()


def wanda_score(w: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2. [out, in], [in] -> [out, in]"""
    return w.abs() * col_norm[None, :]


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    flat = torch.cat([s.reshape(-1) for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


def allocate(ratios: list[float], target: float, lam: float) -> list[float]:
    """Sparsity per block from outlier ratios: mean `target`, spread 2*lam, more outliers ->
    less sparsity."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = r.max() - r.min()
    norm = (r - r.min()) / span if span > 0 else torch.zeros_like(r)
    keep = norm * 2 * lam
    keep = keep - keep.mean() + (1 - target)
    return (1 - keep).clamp(0.0, 0.99).tolist()


@torch.no_grad()
def owl_ratios(model: nn.Module, ctx: Context, threshold: float) -> list[float]:
    """Outlier ratio of each block of the dense model (one calibration pass, nothing changed)."""
    groups = by_block(prune_sites(model))
    ratios: list[float] = [0.0] * len(groups)

    def measure(i: int, block: nn.Module, xs: list, kwargs: dict):
        norms = ColumnNorms()
        observe_block(block, xs, kwargs, [s.local for s in groups[i]], norms.add)
        scores = [wanda_score(s.module.weight.detach(), norms.norm(s.local)) for s in groups[i]]
        ratios[i] = outlier_ratio(scores, threshold)

    calibrate_blocks(model, ctx.calib, ctx.batch_size, measure, "OWL outliers")
    return ratios


def block_sparsities(model: nn.Module, cfg: PruneStep, ctx: Context, blocks: int) -> list[float]:
    """The sparsity of each block: the target everywhere, or OWL's allocation."""
    if cfg.allocation != "owl":
        return [cfg.target] * blocks
    if ctx.calib is None:
        raise ConfigError("allocation owl measures activations: it needs calibration windows")
    ratios = owl_ratios(model, ctx, cfg.owl_threshold)
    out = allocate(ratios, cfg.target, cfg.owl_lambda)
    ctx.report["owl"] = {"outlier_ratio": ratios, "block_sparsity": out}
    return out


def pruning_plan(
    model: nn.Module, cfg: PruneStep, ctx: Context
) -> tuple[dict[int, list[LinearSite]], list[float]]:
    """The linears to prune by block (checked against cfg's N:M pattern), and each block's
    sparsity (block_sparsities)."""
    sites = prune_sites(model)
    check_pattern_fits(sites, cfg)
    groups = by_block(sites)
    return groups, block_sparsities(model, cfg, ctx, len(groups))
