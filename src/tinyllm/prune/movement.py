"""Movement pruning (Sanh et al. 2020) and iterative magnitude pruning: training steps (`Movement`,
`IMP`; stage types movement and imp) driven by the distillation trainer, the dense model as
teacher.

Movement: during fine-tuning each block-linear weight accumulates the score S -= W * dL/dW (weights
moving towards zero score low, whatever their size). Every `every` steps each layer keeps its
highest-scoring weights; the sparsity follows the cubic schedule of Zhu & Gupta (2017) from 0 at
`start` to the target at `end` (fractions of the run), then stays. Masked weights get no gradient.

Iterative magnitude pruning: `rounds` rounds of (prune by magnitude to s_r = 1 - (1 - s)^(r/R),
optionally rewind the surviving weights to their original values, lottery-ticket style, retrain
with the masks fixed).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from tinyllm.core.steps import Context, register
from tinyllm.distill.steps import TrainStep, finish, setup_of, start
from tinyllm.models.anatomy import analyze
from tinyllm.prune.common import layer_mask

log = logging.getLogger(__name__)


def cubic_sparsity(step: int, total: int, target: float, start: float, end: float) -> float:
    """Zhu & Gupta's schedule: 0 before start*total, target after end*total, cubic between."""
    t0, t1 = start * total, end * total
    if step <= t0:
        return 0.0
    if step >= t1:
        return target
    return target * (1 - (1 - (step - t0) / (t1 - t0)) ** 3)


def block_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {
        s.name: s.module.weight for s in analyze(model).linears if isinstance(s.module, nn.Linear)
    }


class MovementPruner:
    """A trainer hook: accumulate movement scores, re-mask on the cubic schedule."""

    def __init__(
        self,
        model: nn.Module,
        target: float,
        steps: int,
        every: int = 10,
        start: float = 0.1,
        end: float = 0.7,
    ) -> None:
        self.weights = block_weights(model)
        self.scores = {n: torch.zeros_like(w) for n, w in self.weights.items()}
        self.masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()}
        self.target, self.steps, self.every, self.start, self.end = target, steps, every, start, end
        for name, w in self.weights.items():
            w.register_hook(lambda g, n=name: g * self.masks[n])

    @torch.no_grad()
    def after_backward(self, _trainer: object) -> None:
        for name, w in self.weights.items():
            if w.grad is not None:
                self.scores[name].sub_(w.detach() * w.grad)

    @torch.no_grad()
    def after_step(self, trainer: object) -> None:
        step = trainer.step + 1
        if step % self.every and step != int(self.end * self.steps):
            return
        sparsity = cubic_sparsity(step, self.steps, self.target, self.start, self.end)
        for name, w in self.weights.items():
            self.masks[name] = layer_mask(self.scores[name], sparsity)
            w.mul_(self.masks[name])

    def to(self, device: torch.device) -> None:
        """Keep scores and masks where the weights train (the trainer moves them)."""
        self.scores = {n: t.to(device) for n, t in self.scores.items()}
        self.masks = {n: t.to(device) for n, t in self.masks.items()}

    def state_dict(self) -> dict:
        return {"scores": self.scores, "masks": self.masks}

    def load_state_dict(self, state: dict) -> None:
        for name in self.weights:
            self.scores[name].copy_(state["scores"][name])
            self.masks[name] = state["masks"][name].to(self.scores[name].device)


@torch.no_grad()
def magnitude_round(model: nn.Module, sparsity: float, original: dict | None) -> None:
    """Prune each block linear to `sparsity` by |W|; with `original`, rewind survivors to it."""
    for name, w in block_weights(model).items():
        mask = layer_mask(w.abs(), sparsity)
        if original is not None:
            w.copy_(original[name])
        w.mul_(mask)


def imp_schedule(target: float, rounds: int) -> list[float]:
    """Sparsity after each round: the same fraction of the survivors removed every round."""
    return [1 - (1 - target) ** ((r + 1) / rounds) for r in range(rounds)]


class Movement(TrainStep):
    """Movement pruning while fine-tuning against the dense teacher (block linears)."""

    prunes: ClassVar[bool] = True  # needs float weights: a recipe runs it before quantizing

    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of weights removed")
    steps: int = Field(200, ge=1, le=10_000_000)
    beta: float = Field(1.0, ge=0, le=100)
    every: int = Field(10, ge=1, description="re-mask every this many steps")
    start: float = Field(0.1, ge=0, lt=1, description="schedule start, fraction of steps")
    end: float = Field(0.7, gt=0, le=1, description="target reached, fraction of steps")


class IMP(TrainStep):
    """Iterative magnitude pruning: rounds of magnitude pruning and recovery training."""

    prunes: ClassVar[bool] = True

    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of weights removed")
    rounds: int = Field(3, ge=1, le=100)
    rewind: bool = False  # reset survivors to the original weights before retraining
    steps: int = Field(200, ge=1, le=10_000_000, description="training steps per round")
    beta: float = Field(1.0, ge=0, le=100)


@register(Movement)
def apply_movement(model: nn.Module, cfg: Movement, ctx: Context) -> None:
    run = start(model, cfg, ctx)
    run.hooks.append(MovementPruner(model, cfg.sparsity, cfg.steps, cfg.every, cfg.start, cfg.end))
    finish(run, cfg, ctx)


@register(IMP)
def apply_imp(model: nn.Module, cfg: IMP, ctx: Context) -> None:
    """Round r prunes to s_r by magnitude (rewinding survivors with `rewind`) and trains in
    workdir/round-r, which also keeps that round's model."""
    setup = setup_of(ctx, cfg)
    original = None
    if cfg.rewind:  # the teacher is the dense model
        original = {n: w.detach().clone() for n, w in block_weights(setup.teacher).items()}
    for r, sparsity in enumerate(imp_schedule(cfg.sparsity, cfg.rounds), start=1):
        log.info("IMP round %d/%d: sparsity %.3f", r, cfg.rounds, sparsity)
        magnitude_round(model, sparsity, original)
        run = start(model, cfg, ctx, setup.workdir / f"round-{r}")
        meta = {"source": setup.specs["source"], "steps": [cfg.describe()], "round": r}
        finish(run, cfg, ctx, save_meta=meta)
