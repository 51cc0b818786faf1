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
from tinyllm.core.stats import collect_stats, outlier_stats
from tinyllm.quant.common import sites_by_block


def outlier_report(model: nn.Module, calib: torch.Tensor, batch_size: int = 8) -> dict[str, dict]:
    """Layer name -> outlier summary of its inputs, from a pass over the unchanged model."""
    by_block = sites_by_block(model, -1)
    report: dict[str, dict] = {}

    def fn(i: int, block: nn.Module, xs: list, kwargs: dict) -> None:
        sites = by_block.get(i, [])
        stats = collect_stats(block, xs, kwargs, [s.local for s in sites], keep=1)
        for s in sites:
            report[s.name] = outlier_stats(stats[s.local])

    calibrate_blocks(model, calib, batch_size, fn, "outliers")
    return report
