"""Activation outlier report: why a model resists W8A8.

For every block linear, the per-input-channel absolute maxima of its inputs on calibration data:
the ratio of the largest to the median channel says how much of an 8-bit per-tensor grid the
typical channel gets (`levels` = 127 * median / max). A ratio in the hundreds means most channels
round to a handful of levels, which is what SmoothQuant's migration flattens.
"""

from __future__ import annotations

import torch
from torch import nn

from tinyllm.core.calib import calibrate_blocks
from tinyllm.kernels.actquant import INT8_MAX, ActStats
from tinyllm.quant.common import sites_by_block


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


def outlier_report(model: nn.Module, calib: torch.Tensor, batch_size: int = 8) -> dict[str, dict]:
    """Layer name -> outlier summary of its inputs, from a pass over the unchanged model."""
    from tinyllm.quant.int8 import collect_stats

    by_block = sites_by_block(model, -1)
    report: dict[str, dict] = {}

    def fn(i: int, block: nn.Module, xs: list, kwargs: dict) -> None:
        sites = by_block.get(i, [])
        stats = collect_stats(block, xs, kwargs, [s.local for s in sites], keep=1)
        for s in sites:
            report[s.name] = outlier_stats(stats[s.local])

    calibrate_blocks(model, calib, batch_size, fn, "outliers")
    return report
