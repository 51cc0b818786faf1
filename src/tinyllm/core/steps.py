"""Step configs, the method registry, and `compress(model, steps, ctx)`.

A step config is a pydantic model that forbids unknown fields (recipes validate into the same
objects). A method registers one `apply(model, cfg, ctx)` for its config class; nothing in shared
code knows about any particular method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from tinyllm.core.kernels import calibration_precision, resolve_calib_dtype
from tinyllm.errors import ConfigError

log = logging.getLogger(__name__)


class Step(BaseModel):
    """Base of every step config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    calibrated: ClassVar[bool] = False  # needs calibration windows

    def whole_model(self) -> str | None:
        """Why these settings need the whole model in memory although the step is one that
        streams (registry.STREAMS); None: it streams."""
        return None

    def describe(self) -> dict[str, Any]:
        """The step as checkpoints and reports record it: its registry name and every field."""
        from tinyllm.core.registry import BY_NAME, name_of

        known = any(e.target.startswith(type(self).__module__ + ":") for e in BY_NAME.values())
        name = name_of(self) if known else type(self).__name__.lower()
        return {"type": name, **self.model_dump()}

    @classmethod
    def from_options(
        cls, options: dict[str, Any], name: str, flag: Callable[[str], str] = str
    ) -> Step:
        """The step from flat options (a CLI's), keeping those it has fields for; a validation
        error becomes one ConfigError line, its field written as `flag(field)`."""
        from pydantic import ValidationError

        try:
            return cls(**{k: v for k, v in options.items() if k in cls.model_fields})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            msg = f"{flag(where)}: {first['msg']}" if where else first["msg"]
            raise ConfigError(f"{name}: {msg}") from None


@dataclass
class Context:
    """What a step may use besides the model: calibration windows and a place for its report."""

    calib: torch.Tensor | None = None  # [samples, seq_len] token ids
    batch_size: int = 8
    # Precision of calibration forwards: float32, bfloat16 or auto (bfloat16 where the CPU
    # computes it natively); see tinyllm.core.kernels.
    calib_dtype: str = "float32"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # compute device
    report: dict[str, Any] = field(default_factory=dict)  # e.g. per-layer errors
    # Per-layer bit widths for weight quantizers (mixed precision), keyed by the full linear
    # name (LinearSite.name); layers not listed use the step's own `bits`. A string is a GGUF
    # type name (q4_0 ... q6_k): the layer gets that type's whole grid.
    layer_bits: dict[str, int | str] = field(default_factory=dict)
    train: TrainSetup | None = None  # what training steps (distill, movement, ...) need


@dataclass
class TrainSetup:
    """What a training step uses: the teacher, the tokenizers, where the trainer keeps its state
    (checkpoint/ to resume, logs, summary), and the model specs it records."""

    teacher: nn.Module
    teacher_tokenizer: Any
    tokenizer: Any  # the student's
    workdir: Path
    resume: bool = False
    overwrite: bool = False
    specs: dict[str, str] = field(default_factory=dict)  # source, teacher


Apply = Callable[[nn.Module, Step, Context], None]
REGISTRY: dict[type[Step], Apply] = {}


def register(cfg_cls: type[Step]) -> Callable[[Apply], Apply]:
    def deco(fn: Apply) -> Apply:
        REGISTRY[cfg_cls] = fn
        return fn

    return deco


def apply_step(model: nn.Module, cfg: Step, ctx: Context) -> None:
    fn = REGISTRY.get(type(cfg))
    if fn is None:
        raise ConfigError(f"no method registered for step {type(cfg).__name__}")
    if cfg.calibrated and ctx.calib is None:
        raise ConfigError(f"{type(cfg).__name__} needs calibration windows (ctx.calib)")
    try:
        dtype = resolve_calib_dtype(ctx.calib_dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if ctx.calib is not None:
        ctx.report["calib_dtype"] = str(dtype).removeprefix("torch.")
    with calibration_precision(dtype):
        fn(model, cfg, ctx)


def compress(model: nn.Module, steps: list[Step], ctx: Context | None = None) -> nn.Module:
    """Apply steps in order, in place; returns the model."""
    ctx = ctx or Context()
    for cfg in steps:
        log.info("applying %s", cfg)
        apply_step(model, cfg, ctx)
    return model


def fit_batch(calib: torch.Tensor | None, batch_size: int) -> int:
    """The largest batch size up to `batch_size` that divides the number of windows."""
    if calib is None:
        return batch_size
    n = calib.shape[0]
    return max(d for d in range(1, min(batch_size, n) + 1) if n % d == 0)


def run_step(
    model: nn.Module,
    cfg: Step,
    calib: torch.Tensor | None = None,
    batch_size: int = 8,
    calib_dtype: str = "float32",
) -> dict[str, Any]:
    """Apply one step in place; returns its report (per-layer facts, seconds)."""
    import time

    ctx = Context(calib=calib, batch_size=fit_batch(calib, batch_size), calib_dtype=calib_dtype)
    t0 = time.perf_counter()
    apply_step(model, cfg, ctx)
    ctx.report["seconds"] = time.perf_counter() - t0
    return ctx.report
