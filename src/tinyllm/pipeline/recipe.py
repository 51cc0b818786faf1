"""Recipes: YAML -> validated step configs, with errors that name the file, line, stage and field.

A recipe never executes code: it is parsed with `util.safe_yaml` (`yaml.SafeLoader` that refuses
duplicate keys, deep nesting and alias bombs) and every stage is validated in pydantic's strict
mode into the same step config the Python API takes: unknown fields are errors, and so is a
value of the wrong type (`bits: "4"`, `bits: 4.5`); an int where a float is expected is fine.

    model: smollm2-135m
    device: auto            # or cpu, cuda, cuda:N (auto: a GPU when present)
    stream: auto            # or on, off: compress one block in memory at a time
    calibration: {corpus: enwiki, samples: 128, seq_len: 512}
    stages:
      - {type: wanda, sparsity: 0.3}
      - {type: gptq, bits: 4, group_size: 128}
    export: [{format: gguf, type: q4_0}]
    gates: [ppl_ratio<=1.3]   # checked on the last stage (a stage may carry its own gates:)
"""

from __future__ import annotations

import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tinyllm.core import registry
from tinyllm.core.compress import STREAM_MODES, Calibration
from tinyllm.core.steps import Step
from tinyllm.distill.steps import Distill, Recover  # noqa: F401  (stage configs, re-exported)
from tinyllm.errors import ConfigError
from tinyllm.eval.gates import Gate, GateError, parse_gate
from tinyllm.util import safe_yaml

log = logging.getLogger(__name__)

RECOMMENDED = "distill -> prune -> quantize"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Evaluation(Section):
    corpus: str = "enwiki"
    windows: int = Field(40, ge=1)
    seq_len: int = Field(512, ge=8)
    tasks: list[str] = Field(default_factory=list)  # built-in task names scored after each stage
    task_limit: int | None = Field(None, ge=1)  # at most this many documents per task


class Export(Section):
    format: Literal["gguf", "onnx", "hf"] = "gguf"
    type: str | None = None  # as `tinyllm export --type`
    strict: bool = False


def stage_classes() -> dict[str, type[Step]]:
    """Stage type -> config class: every step of the registry (core/registry.py)."""
    return registry.step_classes()


def kind_of(cfg: Step) -> str:
    """'prune', 'quantize' or 'train': what a stage does to the model."""
    return registry.kind_of(cfg)


def stage_name(cfg: Step) -> str:
    """The stage type of a config: its registry name."""
    return registry.name_of(cfg)


@dataclass
class Recipe:
    model: str
    stages: list[Step]
    calibration: Calibration = field(default_factory=Calibration)
    evaluation: Evaluation = field(default_factory=Evaluation)
    exports: list[Export] = field(default_factory=list)
    source: str = "<recipe>"
    warnings: list[str] = field(default_factory=list)
    # Where every stage and score computes (auto, cpu, cuda, cuda:N). Not part of `normalized`:
    # a run may resume on another machine.
    device: str = "auto"
    # Compression stages read, compress and write one block at a time (auto: when the model's
    # float32 weights would not fit comfortably; docs/streaming.md). Not part of `normalized`
    # either: a streamed stage writes what an in-memory one writes.
    stream: str = "auto"
    gates: list[Gate] = field(default_factory=list)  # final: on the last stage's result
    stage_gates: list[list[Gate]] = field(default_factory=list)  # per stage (may be shorter)

    def gates_of(self, i: int) -> list[Gate]:
        """Stage i's gates (0-based)."""
        return self.stage_gates[i] if i < len(self.stage_gates) else []

    def normalized(self) -> dict[str, Any]:
        """Every setting, defaults filled in: what a resumed run must match (its `gates` may
        change: a resumed run checks the new ones)."""
        return {
            "model": self.model,
            "calibration": self.calibration.model_dump(),
            "evaluation": self.evaluation.model_dump(),
            "stages": [{"type": stage_name(s), **s.model_dump()} for s in self.stages],
            "export": [e.model_dump() for e in self.exports],
            "gates": {
                "stages": [[g.text for g in self.gates_of(i)] for i in range(len(self.stages))],
                "final": [g.text for g in self.gates],
            },
        }

    def outline(self) -> list[str]:
        """The stages (with the fields the recipe set and their gates) and the exports, one line
        each."""
        lines = [
            f"{i}. {stage_name(s)} {s.model_dump(exclude_unset=True)}"
            + _gates_note(self.gates_of(i - 1))
            for i, s in enumerate(self.stages, 1)
        ]
        lines += [f"export {e.format} {e.type or ''}".rstrip() for e in self.exports]
        return lines + ([f"final{_gates_note(self.gates)}"] if self.gates else [])


def _gates_note(gates: list[Gate]) -> str:
    return f" gates: {', '.join(g.text for g in gates)}" if gates else ""


# --- YAML with line numbers ---------------------------------------------------------------------


def _lines(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Path of every value in the document -> its 1-based line."""
    out = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            out.update(_lines(value, (*path, key.value)))
            out[(*path, key.value)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            out.update(_lines(value, (*path, i)))
    return out


class RecipeError(ConfigError):
    """A recipe that cannot run: the message names the place and the fix."""


@dataclass
class Where:
    source: str
    lines: dict[tuple, int]

    def at(self, path: tuple) -> str:
        """'recipe.yaml, line 7, stage 2 (gptq), field bits' for the closest known path."""
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        parts = [self.source]
        if p in self.lines:
            parts.append(f"line {self.lines[p]}")
        if len(path) >= 2 and path[0] == "stages" and isinstance(path[1], int):
            parts.append(f"stage {path[1] + 1}")
        if len(path) > 2 or (len(path) == 2 and path[0] != "stages"):
            start = 2 if path[0] == "stages" else 0
            parts.append("field " + ".".join(str(x) for x in path[start:]))
        return ", ".join(parts)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (a path, or the name of a built-in recipe)."""
    path = resolve_recipe(path)
    try:
        if path.stat().st_size > safe_yaml.MAX_BYTES:
            raise RecipeError(
                f"{path}: larger than {safe_yaml.MAX_BYTES // 1024} KiB; a recipe is a short "
                "YAML file (is this the right file?)"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte offset {exc.start}); save the recipe as UTF-8"
        ) from exc
    return parse_recipe(text, str(path))


def _yaml(text: str, source: str) -> tuple[Any, Where]:
    """The recipe's data and the line of every value; YAML errors name the line."""
    try:
        node = safe_yaml.compose(text)
        data = safe_yaml.construct(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if isinstance(exc, safe_yaml.RefusedYAML):
            raise RecipeError(f"{source}{line}: {problem}") from exc
        raise RecipeError(f"{source}{line}: not valid YAML ({problem})") from exc
    return data, Where(source, _lines(node) if node is not None else {})


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Validate recipe YAML `text` (`source` names it in errors) into a `Recipe`."""
    data, where = _yaml(text, source)
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with model:, stages: and export:")
    allowed = {"model", "device", "stream", "calibration", "evaluation", "stages", "export"}
    allowed.add("gates")
    for key in data:
        if key not in allowed:
            raise RecipeError(
                f"{where.at((key,))}: unknown section '{key}'; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise RecipeError(
            f"{source}: the recipe needs `model:` (a name such as smollm2-135m, a directory or "
            "a .gguf file) before any stage or export can run"
        )
    stages = [_stage(s, i, where) for i, s in enumerate(_list(data, "stages", where))]
    evaluation = _section(Evaluation, data, "evaluation", where)
    recipe = Recipe(
        model=data["model"],
        stages=stages,
        calibration=_section(Calibration, data, "calibration", where),
        evaluation=evaluation,
        exports=[
            _validate(Export, e, ("export", i), where)
            for i, e in enumerate(_list(data, "export", where))
        ],
        source=source,
        device=_device(data, where),
        stream=_stream(data, where),
        gates=_gates(data.get("gates"), ("gates",), where, evaluation),
        stage_gates=[
            _gates(s.get("gates"), ("stages", i, "gates"), where, evaluation)
            for i, s in enumerate(data.get("stages") or [])
        ],
    )
    recipe.warnings = check_order(recipe.stages, where)
    return recipe


def _gates(value: Any, path: tuple, where: Where, evaluation: Evaluation) -> list[Gate]:
    """A `gates:` list (docs/gates.md), each gate checked against what the run measures."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise RecipeError(
            f"{where.at(path)}: `gates:` is a list of gates such as ['kld<=0.1', 'ppl_ratio<=1.1']"
        )
    gates = []
    for j, text in enumerate(value):
        try:
            gate = parse_gate(text)
        except GateError as exc:
            raise RecipeError(f"{where.at((*path, j))}: {exc}") from exc
        problem = _gate_problem(gate, evaluation)
        if problem:
            raise RecipeError(f"{where.at((*path, j))}: gate {gate.text!r}: {problem}")
        gates.append(gate)
    return gates


def _gate_problem(gate: Gate, evaluation: Evaluation) -> str | None:
    """Why a gate cannot work in a recipe, whose baseline is the original model."""
    base, _, task = gate.metric.partition(":")
    if gate.relative and base in ("kld", "top1"):
        return (
            f"relative gates compare with the original model, whose {base} against itself is "
            f"{0 if base == 'kld' else 1} by definition; write an absolute limit "
            f"({'kld<=0.05' if base == 'kld' else 'top1>=0.9'})"
        )
    if task and task not in evaluation.tasks:
        return f"the run does not score task {task!r}; add it: `evaluation: {{tasks: ['{task}']}}`"
    return None


def _device(data: dict, where: Where) -> str:
    """The `device:` key, checked for spelling here (for a GPU present: when the run starts)."""
    from tinyllm.util.device import DEVICE_HELP, is_device_spec

    value = data.get("device", "auto")
    if not is_device_spec(value):
        raise RecipeError(
            f"{where.at(('device',))}, field device: unknown device {value!r}; use {DEVICE_HELP}"
        )
    return value.strip().lower()


def _stream(data: dict, where: Where) -> str:
    """The `stream:` key: auto, on or off (core.compress.STREAM_MODES)."""
    value = data.get("stream", "auto")
    if isinstance(value, bool):  # YAML reads a bare on/off as a boolean
        value = "on" if value else "off"
    if value not in STREAM_MODES:
        raise RecipeError(
            f"{where.at(('stream',))}, field stream: {value!r} is not one of "
            f"{', '.join(STREAM_MODES)} (on: one block in memory at a time; docs/streaming.md)"
        )
    return value


def _list(data: dict, key: str, where: Where) -> list:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise RecipeError(f"{where.at((key,))}: `{key}:` must be a list (one '- ' item per entry)")
    return value


def _section(cls: type[Section], data: dict, key: str, where: Where) -> Section:
    return _validate(cls, data.get(key) or {}, (key,), where)


def _validate(cls: type[BaseModel], value: Any, path: tuple, where: Where) -> Any:
    """`cls` from a YAML mapping in strict mode: "4" or 4.5 for an int is an error."""
    if not isinstance(value, dict):
        raise RecipeError(f"{where.at(path)}: expected a mapping of {cls.__name__} fields")
    _check_finite(value, path, where)
    try:
        return cls.model_validate(value, strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(x for x in err["loc"] if x != "__root__")
        fields = ", ".join(cls.model_fields)
        if err["type"] == "extra_forbidden":
            msg = f"unknown field '{loc[-1]}'; allowed: {fields}"
        else:
            msg = err["msg"]
            if err["type"] not in ("value_error", "assertion_error"):
                msg += f" (got {err.get('input')!r})" + _type_hint(err["type"], err.get("input"))
        raise RecipeError(f"{where.at((*path, *loc))}: {msg}") from exc


def _type_hint(kind: str, value: Any) -> str:
    """What to write instead of a value of the wrong YAML type."""
    if kind in ("int_type", "float_type", "bool_type") and isinstance(value, str):
        return "; write numbers and true/false without quotes"
    if kind == "int_type" and isinstance(value, float):
        return "; this field takes a whole number"
    if kind == "string_type" and not isinstance(value, str):
        return "; put the value in quotes to make it text"
    return ""


def _check_finite(value: Any, path: tuple, where: Where) -> None:
    """No recipe field takes .inf or .nan."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, v in items:
        if isinstance(v, float) and not math.isfinite(v):
            raise RecipeError(f"{where.at((*path, key))}: {v} is not a usable number")
        if isinstance(v, dict | list):
            _check_finite(v, (*path, key), where)


def _stage(value: Any, i: int, where: Where) -> BaseModel:
    classes = stage_classes()
    path = ("stages", i)
    if not isinstance(value, dict) or "type" not in value:
        raise RecipeError(
            f"{where.at(path)}: a stage is a mapping with a `type:` ({', '.join(classes)})"
        )
    value = dict(value)
    value.pop("gates", None)  # read by _gates
    kind = value.pop("type")
    if not isinstance(kind, str):
        raise RecipeError(f"{where.at((*path, 'type'))}: `type:` is a name ({', '.join(classes)})")
    if kind == "export":
        raise RecipeError(
            f"{where.at(path)}: export is not a stage: list exports under `export:` after the "
            "stages, so they run on the finished model"
        )
    if kind not in classes:
        raise RecipeError(
            f"{where.at((*path, 'type'))}: unknown stage type '{kind}'; allowed: "
            f"{', '.join(classes)}"
        )
    return _with_base(kind, value, path, where, classes)


def _with_base(kind: str, value: dict, path: tuple, where: Where, classes: dict) -> BaseModel:
    """Validate a stage whose `base:` is itself a stage (AWQ over rtn|gptq, mixed over
    rtn|gptq|awq); the allowed base types are read from the config's `base` annotation."""
    field = classes[kind].model_fields.get("base")
    if field is not None and isinstance(value.get("base"), dict):
        allowed = [k for k, c in classes.items() if c in typing.get_args(field.annotation)]
        base = dict(value["base"])
        base_kind = base.pop("type", "rtn")
        if base_kind not in allowed:
            raise RecipeError(
                f"{where.at((*path, 'base'))}: {kind}'s base must be one of {', '.join(allowed)}"
            )
        value["base"] = _with_base(base_kind, base, (*path, "base"), where, classes)
    return _validate(classes[kind], value, path, where)


def check_order(stages: list[BaseModel], where: Where | None = None) -> list[str]:
    """Refuse impossible orders; return warnings for orders known to hurt."""
    from tinyllm.quant.embed import Embeddings

    warnings: list[str] = []
    pruned = False
    targets: set[str] = set()  # what is quantized so far: linears, embeddings
    for i, cfg in enumerate(stages):
        kind, name = kind_of(cfg), stage_name(cfg)
        at = where.at(("stages", i)) if where else f"stage {i + 1}"
        target = "embeddings" if isinstance(cfg, Embeddings) else "linears"
        quantized = bool(targets)
        if kind == "train" and "embeddings" in targets:
            raise RecipeError(
                f"{at}: {name} after quantizing the embeddings: training keeps the embeddings "
                "in float; make the embeddings stage the last one"
            )
        if (kind == "prune" or getattr(type(cfg), "prunes", False)) and quantized:
            raise RecipeError(
                f"{at}: {name} after quantization: pruners need float weights. Prune first, then "
                f"quantize (recommended order: {RECOMMENDED})"
            )
        if kind == "quantize" and target in targets:
            raise RecipeError(
                f"{at}: {name} on already quantized {target}: a recipe quantizes them once; "
                "choose one quantization stage for them"
            )
        if kind == "train" and getattr(cfg, "layers", None) and (pruned or quantized):
            warnings.append(
                f"{at}: dropping blocks after pruning or quantization throws away what those "
                f"stages calibrated; the recommended order is {RECOMMENDED}"
            )
        if kind == "quantize":
            targets.add(target)
        pruned |= kind == "prune"
    return warnings


# --- built-in recipes ---------------------------------------------------------------------------


def builtin_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes"


def builtin_recipes() -> dict[str, tuple[Path, str]]:
    """Name -> (path, its one-line description: the first comment line)."""
    out = {}
    for path in sorted(builtin_dir().glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        out[path.stem] = (path, first.lstrip("# ").strip())
    return out


def resolve_recipe(spec: str | Path) -> Path:
    """A recipe file, or the name of a built-in recipe (`tinyllm recipes` lists them)."""
    path = Path(spec)
    if path.is_file():
        return path
    builtins = builtin_recipes()
    if str(spec) in builtins:
        return builtins[str(spec)][0]
    raise RecipeError(
        f"no recipe file {spec}; give a YAML path or a built-in recipe: {', '.join(builtins)}"
    )
