"""The one table of named steps: name -> config class (imported lazily) and kind.

Every name map is derived from `STEPS`: the quantizers and pruners of `quant.api` and
`prune.api`, the recipe stage types, report labels, the CLI's --method choices and the stage list
of `tinyllm run --help`. Core never imports a method module at import time (methods sit a layer
above it); `step_class(name)` imports the module, which registers the method's `apply`.

A new method is one file (config class, pure tensor function, `@register` apply) plus one line
here; see docs/adding-a-method.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tinyllm.errors import ConfigError

if TYPE_CHECKING:
    from tinyllm.core.steps import Step

Kind = Literal["prune", "quantize", "train"]


@dataclass(frozen=True)
class Entry:
    """One named step: where its config class lives and what it does to the model."""

    name: str
    target: str  # "module:Class"
    kind: Kind
    summary: str
    command: str = ""  # the CLI command that offers it, when not the kind's own

    @property
    def cli(self) -> str:
        """`tinyllm prune`, `quantize` or `distill`: the command whose --method takes it."""
        return self.command or {"prune": "prune", "quantize": "quantize"}.get(self.kind, "distill")

    def load(self) -> type[Step]:
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)


STEPS: tuple[Entry, ...] = (
    Entry("magnitude", "tinyllm.prune.magnitude:Magnitude", "prune", "smallest |W|"),
    Entry("wanda", "tinyllm.prune.wanda:Wanda", "prune", "|W| * ||X|| per output row"),
    Entry("sparsegpt", "tinyllm.prune.sparsegpt:SparseGPT", "prune", "OBS updates, + bits"),
    Entry("channels", "tinyllm.prune.structured:Channels", "prune", "FFN channels"),
    Entry("heads", "tinyllm.prune.structured:Heads", "prune", "whole KV groups"),
    Entry("blocks", "tinyllm.prune.structured:Blocks", "prune", "whole decoder blocks"),
    Entry("rtn", "tinyllm.quant.rtn:RTN", "quantize", "round to nearest"),
    Entry("gptq", "tinyllm.quant.gptq:GPTQ", "quantize", "Hessian-aware rounding"),
    Entry("awq", "tinyllm.quant.awq:AWQ", "quantize", "activation-aware scales over a base"),
    Entry("nf4", "tinyllm.quant.nf4:NF4", "quantize", "4-bit normal-float codebook"),
    Entry("embeddings", "tinyllm.quant.embed:Embeddings", "quantize", "embeddings and head"),
    Entry("mixed", "tinyllm.quant.mixed:Mixed", "quantize", "per-layer bits under a budget"),
    Entry("int8-dynamic", "tinyllm.quant.int8:Int8Dynamic", "quantize", "W8A8, per-token"),
    Entry("int8-static", "tinyllm.quant.int8:Int8Static", "quantize", "W8A8, calibrated"),
    Entry("smoothquant", "tinyllm.quant.smoothquant:SmoothQuant", "quantize", "W8A8 smoothed"),
    Entry("fp8", "tinyllm.quant.fp8:FP8", "quantize", "FP8 weights and activations"),
    Entry("distill", "tinyllm.distill.steps:Distill", "train", "knowledge distillation"),
    Entry("recover", "tinyllm.distill.steps:Recover", "train", "KD + task loss recovery"),
    Entry("movement", "tinyllm.prune.movement:Movement", "train", "movement pruning", "prune"),
    Entry("imp", "tinyllm.prune.movement:IMP", "train", "iterative magnitude pruning", "prune"),
)
BY_NAME: dict[str, Entry] = {e.name: e for e in STEPS}


# Steps that work block by block through core.calib (calibrate_blocks, for_each_block) and need
# no other part of the model: they run on a streamed model (core/stream.py), one block in memory.
# tests/core/test_stream.py proves each gives the in-memory result.
STREAMS = frozenset(
    {"gptq", "awq", "rtn", "nf4", "wanda", "sparsegpt", "smoothquant", "int8-static"}
    | {"channels", "heads", "blocks"}  # activation importance (gradient: Step.whole_model)
    | {"mixed"}  # from a given allocation or cached sensitivities (measuring: Step.whole_model)
)


def names(kind: Kind | None = None) -> list[str]:
    """Step names in table order, all or of one kind."""
    return [e.name for e in STEPS if kind is None or e.kind == kind]


def methods(command: str) -> list[str]:
    """The --method choices of `tinyllm prune` or `tinyllm quantize`, in table order."""
    return [e.name for e in STEPS if e.cli == command]


def step_class(name: str) -> type[Step]:
    """The config class of step `name` (its module is imported, so its apply is registered)."""
    if name not in BY_NAME:
        raise ConfigError(f"unknown step '{name}'; choose one of {', '.join(BY_NAME)}")
    return BY_NAME[name].load()


def step_classes(kind: Kind | None = None) -> dict[str, type[Step]]:
    """Name -> config class, all or of one kind."""
    return {n: step_class(n) for n in names(kind)}


def entry_of(cfg: Step | type[Step]) -> Entry:
    """The registry entry of a step config (or its class)."""
    cls = cfg if isinstance(cfg, type) else type(cfg)
    for e in STEPS:
        module, name = e.target.split(":")
        if cls.__module__ == module and cls.__name__ == name:
            return e
    raise ConfigError(f"{cls.__name__} is not a registered step; add it to core/registry.py")


def name_of(cfg: Step | type[Step]) -> str:
    """The registry name of a step config: 'int8-dynamic', 'gptq', ..."""
    return entry_of(cfg).name


def kind_of(cfg: Step | type[Step]) -> Kind:
    """'prune', 'quantize' or 'train': what a step does to the model."""
    return entry_of(cfg).kind


def stage_table() -> str:
    """One line per step, by kind, for --help texts and docs."""
    lines = []
    for kind in ("prune", "quantize", "train"):
        lines.append(f"{kind}: " + ", ".join(names(kind)))  # type: ignore[arg-type]
    return "; ".join(lines)
