"""Movement pruning (Sanh et al. 2020) and iterative magnitude pruning, both driven by the
distillation trainer (the dense model is its own teacher).

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
from pathlib import Path

import torch
from torch import nn

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

    def state_dict(self) -> dict:
        return {"scores": self.scores, "masks": self.masks}

    def load_state_dict(self, state: dict) -> None:
        for name in self.weights:
            self.scores[name].copy_(state["scores"][name])
            self.masks[name] = state["masks"][name]


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


def iterative_magnitude(
    teacher_spec: str, cfg: object, out: Path, target: float, rounds: int, rewind: bool
) -> dict:
    """Rounds of magnitude pruning and distillation recovery from the dense teacher; round r
    trains in out/round-r and the next round starts from its model. -> last round's summary"""
    from tinyllm.distill.trainer import distill, make_run
    from tinyllm.models.load import load

    original = None
    if rewind:
        dense, _ = load(teacher_spec)
        original = {n: w.detach().clone() for n, w in block_weights(dense).items()}
        del dense
    student_spec: str | None = None
    summary: dict = {}
    for r, sparsity in enumerate(imp_schedule(target, rounds), start=1):
        log.info("IMP round %d/%d: sparsity %.3f", r, rounds, sparsity)
        run, meta = make_run(
            teacher_spec,
            student_spec or teacher_spec,
            None,
            cfg,
            Path(out) / f"round-{r}",
            overwrite=True,
            prepare=lambda m, s=sparsity: magnitude_round(m, s, original),
        )
        summary = distill(run, cfg, save_meta=meta)
        student_spec = str(Path(out) / f"round-{r}" / "model")
    return summary
