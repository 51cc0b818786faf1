"""Activation statistics of a block's linear inputs (ranges, absolute means, outlier summaries),
shared by the W8A8 steps, SmoothQuant and the outlier report."""

from __future__ import annotations

import torch
from torch import nn

from tinyllm.core.calib import observe_block
from tinyllm.core.steps import Context
from tinyllm.kernels.actquant import INT8_MAX, ActStats, stride_for
from tinyllm.models.anatomy import LinearSite
from tinyllm.util import dist

KEEP_TOKENS = 16384  # token subsample per layer input for percentile / MSE observers


def collect_stats(
    block: nn.Module,
    xs: list[torch.Tensor],
    kwargs: dict,
    names: list[str],
    keep: int = KEEP_TOKENS,
) -> dict[str, ActStats]:
    """Run the block over the calibration inputs and return each named linear's input stats
    (about `keep` tokens subsampled for the observers that need values). Under several
    processes the extremes, absolute sums and token counts cover every rank's tokens; the
    subsample stays this rank's own (methods that read it refuse to run data-parallel)."""
    total = sum(x.shape[0] * x.shape[1] for x in xs)
    step = stride_for(total, keep)
    stats = {n: ActStats(step) for n in names}
    observe_block(block, xs, kwargs, names, lambda n, x: stats[n].add(x))
    reduce_stats(stats)
    return stats


def reduce_stats(stats: dict[str, ActStats]) -> None:
    """Combine every rank's statistics in place (extremes by min/max, sums and token counts
    summed); a no-op in a single process."""
    if dist.world() == 1:
        return
    for name in sorted(stats):
        st = stats[name]
        dist.all_reduce_min(st.lo)
        dist.all_reduce_max(st.hi)
        dist.all_reduce_sum(st.absmean)
        st.tokens = int(dist.sum_over_ranks(float(st.tokens)))


def outlier_stats(st: ActStats) -> dict:
    """Summary of one layer's input statistics."""
    amax = torch.maximum(st.lo.abs(), st.hi.abs())  # [in]
    med = float(amax.median().clamp_min(1e-12))
    top = amax.topk(min(3, amax.numel()))
    mean_abs = st.absmean / max(st.tokens, 1)
    return {
        "max": float(amax.max()),
        "median_channel_max": med,
        "ratio": float(amax.max()) / med,
        "levels": INT8_MAX * med / float(amax.max().clamp_min(1e-12)),
        "mean_abs": float(mean_abs.mean()),
        "top_channels": top.indices.tolist(),
    }


def record_outliers(
    ctx: Context, sites: list[LinearSite], stats: dict[str, ActStats], key: str = "outliers"
) -> None:
    """Keep each layer's input outlier summary in the step's report."""
    report = ctx.report.setdefault(key, {})
    for s in sites:
        report[s.name] = outlier_stats(stats[s.local])
