"""`prune(model, cfg, calib=...)`: the Python entry point for every pruner."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tinyllm.core import registry
from tinyllm.core.steps import Step, run_step


def step_classes() -> dict[str, type[Step]]:
    """Method name -> step config class, from the step registry (importing registers them)."""
    return registry.step_classes("prune")


def prune(
    model: nn.Module,
    cfg: Step,
    calib: torch.Tensor | None = None,
    batch_size: int = 8,
    calib_dtype: str = "float32",
) -> dict[str, Any]:
    """Prune `model` in place with `cfg`; returns the report (per-layer sparsity, seconds).
    `calib_dtype`: precision of the calibration passes (auto, float32, bfloat16)."""
    step_classes()  # registers the methods
    if getattr(cfg, "allocation", None) == "owl" and calib is None:
        from tinyllm.errors import ConfigError

        raise ConfigError("allocation owl measures activations: it needs calibration windows")
    return run_step(model, cfg, calib, batch_size, calib_dtype)
