"""Shared pruning pieces: config fields, masks from scores (unstructured, per row, N:M), the
layers to prune and refusal of quantized models (the achieved sparsity: models.sparsity).

Convention: a score is larger for weights worth keeping; a mask is True where a weight stays.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import field_validator, model_validator
from torch import nn

from tinyllm.core.steps import Step
from tinyllm.errors import ArchitectureError, ConfigError
from tinyllm.models.anatomy import LinearSite, analyze

log = logging.getLogger(__name__)


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N of every M consecutive input weights."""
    if pattern is None:
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must look like N:M (for example 2:4), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


class PruneStep(Step):
    """Fields every unstructured / semi-structured pruner shares."""

    sparsity: float = 0.5  # fraction of weights removed (ignored with a pattern: 1 - N/M)
    pattern: str | None = None  # N:M semi-structured, e.g. "2:4"
    allocation: Literal["uniform", "owl"] = "uniform"
    owl_lambda: float = 0.08  # OWL: sparsities stay within target +- lambda
    owl_threshold: float = 5.0  # OWL: an outlier is a score above this multiple of the mean

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {v}")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        parse_pattern(v)
        return v

    @model_validator(mode="after")
    def _owl_pattern(self) -> PruneStep:
        if self.allocation == "owl" and self.pattern is not None:
            raise ValueError("allocation owl varies sparsity per block; an N:M pattern fixes it")
        return self

    @property
    def calibrated(self) -> bool:  # OWL measures activations; calibrated pruners say True
        return self.allocation == "owl"

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else self.sparsity


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the lowest-scoring `sparsity` fraction of each output row. [out, in] -> bool"""
    k = int(score.shape[1] * sparsity)
    mask = torch.ones_like(score, dtype=torch.bool)
    if k:
        drop = score.topk(k, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the lowest-scoring `sparsity` fraction of the whole matrix. -> bool"""
    k = int(score.numel() * sparsity)
    mask = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        mask[score.reshape(-1).topk(k, largest=False).indices] = False
    return mask.reshape(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest-scoring of every M consecutive inputs of each row. -> bool"""
    rows, cols = score.shape
    if cols % m:
        raise ConfigError(f"an {n}:{m} pattern needs input features divisible by {m}, got {cols}")
    g = score.reshape(rows, cols // m, m)
    keep = g.topk(n, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def check_float_model(model: nn.Module) -> None:
    """Pruning works on float weights: refuse quantized checkpoints."""
    if any(getattr(m, "qweight", None) is not None for m in model.modules()):
        raise ConfigError(
            "this model is already quantized: prune the float model first, then quantize "
            "(distill -> prune -> quantize)"
        )


def prune_sites(model: nn.Module) -> list[LinearSite]:
    check_float_model(model)
    sites = [s for s in analyze(model).linears if isinstance(s.module, nn.Linear)]
    if not sites:
        raise ArchitectureError("no float linear layers to prune in the decoder blocks")
    return sites


def check_pattern_fits(sites: list[LinearSite], cfg: PruneStep) -> None:
    nm = cfg.nm
    if nm is None:
        return
    for s in sites:
        if s.module.in_features % nm[1]:
            raise ConfigError(
                f"pattern {cfg.pattern} does not divide the {s.module.in_features} input "
                f"features of {s.name}"
            )


def mask_from_score(score: torch.Tensor, cfg: PruneStep, sparsity: float) -> torch.Tensor:
    """The mask a per-row scored pruner applies: N:M if a pattern is set, else per row."""
    nm = cfg.nm
    return nm_mask(score, *nm) if nm else row_mask(score, sparsity)


def by_block(sites: list[LinearSite]) -> dict[int, list[LinearSite]]:
    out: dict[int, list[LinearSite]] = {}
    for s in sites:
        out.setdefault(s.block, []).append(s)
    return out
