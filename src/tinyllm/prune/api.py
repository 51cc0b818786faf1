"""`prune(model, cfg, calib=...)`: the Python entry point for every pruner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tinyllm.core import registry
from tinyllm.core.steps import Step, run_step
from tinyllm.errors import ConfigError


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
        raise ConfigError("allocation owl measures activations: it needs calibration windows")
    return run_step(model, cfg, calib, batch_size, calib_dtype)


def training_pruners() -> dict[str, type[Step]]:
    """Training steps that prune (movement, imp): `tinyllm prune` offers them too."""
    return {n: registry.step_class(n) for n in registry.methods("prune") if n not in step_classes()}


def step_fields(method: str) -> set[str]:
    """The options `prune_step(method, ...)` uses (`sparsity` stands for a structured ratio)."""
    cls = {**step_classes(), **training_pruners()}[method]
    fields = set(cls.model_fields)
    return fields | {"sparsity"} if "ratio" in fields else fields


def prune_step(method: str, options: dict[str, Any], flag: Callable[[str], str] = str) -> Step:
    """The step of `method` from flat options; `sparsity` is also the structured methods'
    `ratio` (heads: unless `count` is given)."""
    classes = {**step_classes(), **training_pruners()}
    if method not in classes:
        raise ConfigError(f"unknown method '{method}'; choose one of {', '.join(classes)}")
    options = dict(options)
    if "sparsity" in options:
        options.setdefault("ratio", options["sparsity"])
    if method == "heads" and options.get("count") is not None:
        options["ratio"] = None
    if method == "blocks" and options.get("count") is None:
        raise ConfigError(f"--method blocks needs {flag('count')} N (blocks to remove)")
    return classes[method].from_options(options, method, flag)
