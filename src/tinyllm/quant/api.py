"""`quantize(model, cfg, calib=...)`: the Python entry point for every weight quantizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tinyllm.core.steps import Context, Step, apply_step


def step_classes() -> dict[str, type[Step]]:
    """Method name -> step config class (importing a method registers it)."""
    from tinyllm.quant import awq, gptq, nf4, rtn

    return {"rtn": rtn.RTN, "gptq": gptq.GPTQ, "awq": awq.AWQ, "nf4": nf4.NF4}


def quantize(
    model: nn.Module, cfg: Step, calib: torch.Tensor | None = None, batch_size: int = 8
) -> dict[str, Any]:
    """Quantize `model` in place with `cfg`; returns the report (per-layer errors, seconds)."""
    import time

    step_classes()  # registers the methods
    if calib is not None:
        n = calib.shape[0]
        batch_size = max(d for d in range(1, min(batch_size, n) + 1) if n % d == 0)
    ctx = Context(calib=calib, batch_size=batch_size)
    t0 = time.perf_counter()
    apply_step(model, cfg, ctx)
    ctx.report["seconds"] = time.perf_counter() - t0
    return ctx.report
