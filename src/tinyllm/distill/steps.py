"""Training steps: distill and recover, and the helpers every training step uses (movement and
iterative magnitude pruning in `prune.movement` train through them too).

A training step is a step like any other: `compress(source, [Distill(layers=15)], out=...)`, a
recipe stage `{type: distill, layers: 15}` or `tinyllm distill`. It trains the model in place
against `ctx.train.teacher` (by default the source model) and keeps its trainer state (checkpoint/
for resuming, log.csv, summary.json) in `ctx.train.workdir`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from torch import nn

from tinyllm.core.steps import Context, Step, TrainSetup, register
from tinyllm.distill.trainer import DistillConfig, Run
from tinyllm.errors import ConfigError

REPORTED = ("train_seconds", "tokens_per_second", "recovery", "teacher_eval")


class TrainStep(DistillConfig, Step):
    """Every setting of the distillation trainer, as a step."""

    def trainer_config(self) -> DistillConfig:
        return DistillConfig(**self.model_dump(include=set(DistillConfig.model_fields)))


class Distill(TrainStep):
    """Train the current model (or a layer-dropped copy) against the teacher.

    As a step the trainer's own evaluations are kept small (a recipe scores every stage)."""

    layers: int | None = Field(None, ge=1, description="keep this many evenly spaced blocks")
    eval_every: int = Field(0, ge=0)
    final_eval_windows: int = Field(2, ge=1)


class Recover(Distill):
    """Recovery training after pruning or quantization: KD + task loss on the current model."""

    beta: float = Field(1.0, ge=0, le=100)


def setup_of(ctx: Context, cfg: Step) -> TrainSetup:
    """The training setup of `ctx`, or a ConfigError saying what a training step needs."""
    if ctx.train is None:
        raise ConfigError(
            f"{cfg.describe()['type']} is a training step: it needs a teacher and a work "
            "directory; run it through tinyllm.compress(..., out=DIR) or a recipe"
        )
    return ctx.train


def start(model: nn.Module, cfg: TrainStep, ctx: Context, out: Path | None = None) -> Run:
    """A trainer run of `model` (in place) against the teacher, writing into `out`."""
    from tinyllm.distill.student import check_pair
    from tinyllm.distill.trainer import build_run, prepare_output

    setup = setup_of(ctx, cfg)
    out = Path(out or setup.workdir)
    prepare_output(out, setup.resume, setup.overwrite)
    check_pair(setup.teacher, setup.teacher_tokenizer, model, setup.tokenizer)
    identity = {**setup.specs, "layers": getattr(cfg, "layers", None)}
    identity["student"] = identity.pop("source", None)
    trainer_cfg = cfg.trainer_config()
    return build_run(setup.teacher, setup.tokenizer, model, trainer_cfg, out, identity, ctx.device)


def finish(run: Run, cfg: TrainStep, ctx: Context, save_meta: dict | None = None) -> dict:
    """Train `run` to the end; its numbers go into `ctx.report`. -> the trainer's summary"""
    from tinyllm.distill.trainer import distill

    setup = setup_of(ctx, cfg)
    summary = distill(
        run, cfg.trainer_config(), setup.resume, save_meta=save_meta, save=save_meta is not None
    )
    ctx.report.update({k: summary[k] for k in REPORTED if k in summary})
    if "after" in summary:
        results = {k: summary[k] for k in ("before", "after", "recovery")}
        ctx.report["checkpoint_meta"] = {"distill": results}
    return summary


def drop_blocks(model: nn.Module, layers: int) -> None:
    """Keep `layers` evenly spaced decoder blocks of `model`, in place."""
    from tinyllm.distill.student import kept_blocks
    from tinyllm.models.anatomy import find_blocks
    from tinyllm.models.surgery import keep_blocks

    keep_blocks(model, kept_blocks(len(find_blocks(model)[1]), layers))


@register(Distill)
def apply(model: nn.Module, cfg: Distill, ctx: Context) -> None:
    if cfg.layers is not None:
        drop_blocks(model, cfg.layers)
    finish(start(model, cfg, ctx), cfg, ctx)


register(Recover)(apply)
