"""`quantize(model, cfg, calib=...)`: the Python entry point for every weight quantizer."""

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
    return registry.step_classes("quantize")


def quantize(
    model: nn.Module,
    cfg: Step,
    calib: torch.Tensor | None = None,
    batch_size: int = 8,
    calib_dtype: str = "float32",
) -> dict[str, Any]:
    """Quantize `model` in place with `cfg`; returns the report (per-layer errors, seconds).
    `calib_dtype`: precision of the calibration passes (auto, float32, bfloat16)."""
    step_classes()  # registers the methods
    return run_step(model, cfg, calib, batch_size, calib_dtype)


WRAPPERS = ("awq", "mixed")  # methods that quantize through a base method
BASES = {"awq": ("rtn", "gptq"), "mixed": ("rtn", "gptq", "awq")}
# A flat option that a method's field takes under another name (NF4's blocks are its groups).
RENAMED = {"nf4": {"group_size": "block_size"}}


def step_fields(method: str, base: str = "rtn") -> set[str]:
    """The options `quant_step(method, ..., base)` uses: the method's fields and its base's."""
    classes = step_classes()
    fields = set(classes[method].model_fields) | set(RENAMED.get(method, {}))
    if method == "mixed":
        fields = {"candidate_bits", "candidate_types", "avg_bits", "size_mb", "target_bpw", "base"}
        fields |= {"sensitivity_cache", "sensitivity", "layout_from"}
    if method in WRAPPERS:
        fields |= step_fields(base) if base in classes else set()
    return fields


def quant_step(
    method: str, options: dict[str, Any], base: str = "rtn", flag: Callable[[str], str] = str
) -> Step:
    """The step of `method` from flat options (`step_fields` tells which it uses): AWQ wraps
    `base` (rtn | gptq), mixed wraps `base` (rtn | gptq | awq) and takes `candidate_bits`."""
    classes = step_classes()
    if method not in classes:
        raise ConfigError(f"unknown method '{method}'; choose one of {', '.join(classes)}")
    if method not in WRAPPERS:
        for old, new in RENAMED.get(method, {}).items():
            options = {new: options[old], **options} if old in options else options
        return classes[method].from_options(options, method, flag)
    if base not in BASES[method]:
        raise ConfigError(
            f"{flag('base')} must be {' or '.join(BASES[method])} for {method}, got '{base}'"
        )
    inner = quant_step(base, options, "rtn", flag)
    if method == "awq":
        return classes["awq"].from_options({**options, "base": inner}, "awq", flag)
    budget = ("avg_bits", "size_mb", "target_bpw", "sensitivity_cache", "allocation", "sensitivity")
    mixed = {k: options[k] for k in budget if k in options}
    mixed.update(base=inner, bits=options.get("candidate_bits", [3, 4, 8]))
    types = options.get("candidate_types")
    if not types and options.get("target_bpw") is not None:
        from tinyllm.quant.mixed import DEFAULT_TYPES

        types = list(DEFAULT_TYPES)
    if types:
        mixed["types"] = types
    return classes["mixed"].from_options(mixed, "mixed", flag)
