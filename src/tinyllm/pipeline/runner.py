"""`run_recipe`: every stage in order, each checkpointed atomically and scored, resumable.

Output directory:

    recipe.yaml          the recipe as given (a resumed run: as last given)
    state.json           the normalized recipe, the original's and every finished stage's numbers
    stages/01-wanda/     one tinyllm checkpoint per stage (training stages: a trainer directory
                         whose model/ is the checkpoint, checkpoint/ lets a killed stage resume)
    export/              the exported files, each scored through the runtime that reads it
                         (GGUF: llama.cpp, ONNX: onnxruntime, hf: transformers) on the same
                         windows and tasks as the stages: state.json "exports"[i]["eval"]
    gates.xml            the gate results as JUnit XML (when the recipe has gates)
    report.md, report.html

Every stage starts from the previous stage's checkpoint on disk, so a run resumed after a crash
computes exactly what an uninterrupted run computes.

Gates (docs/gates.md): a stage's `gates:` are checked right after it is scored, the recipe's final
`gates:` on the last stage before anything is exported, relative ones against the original's
scores, and then on each exported file's own scores (the gates on what a file holds: ppl,
ppl_ratio, kld, top1, size, task:NAME). A failed gate stops the run (`StageGateError`) with the
stage or export marked in state.json, the report and OUTPUT/gates.xml (JUnit). `--resume`
accepts a changed recipe: changed gates are checked again on the stored scores; a changed stage
is run again with every stage after it, the stages before it are kept; a changed model,
calibration or evaluation is refused.

A run holds the directory's lock (`rundir.locked`) from start to end; `--overwrite` replaces only
a run directory, and only once the new run's first files are in place (`util.fs.atomic_dir`).
"""

from __future__ import annotations

import difflib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel
from torch import nn

from tinyllm.checkpoint import weight_files
from tinyllm.errors import TinyLLMError
from tinyllm.eval.gates import GatesFailedError, check_gates, summary, write_junit_suites
from tinyllm.pipeline.recipe import (
    Calibration,
    Evaluation,
    Recipe,
    RecipeError,
    kind_of,
    stage_name,
)
from tinyllm.pipeline.rundir import RECIPE, STATE, CorruptStateError, is_run_dir, locked, read_state
from tinyllm.util.fs import atomic_dir, recover_dir, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

JUNIT = "gates.xml"
# final gates also checked on each exported file's scores (the others measure tinyllm's harness)
EXPORT_METRICS = ("ppl", "ppl_ratio", "kld", "top1", "size", "task")


class StageGateError(GatesFailedError):
    """A stage (or the finished model) missed a gate of the recipe; the run stopped there."""

    def __init__(self, message: str, state: dict) -> None:
        super().__init__(message)
        self.state = state


def stage_dir(out: Path, i: int, cfg: BaseModel) -> Path:
    return out / "stages" / f"{i + 1:02d}-{stage_name(cfg)}"


def model_dir(out: Path, i: int, cfg: BaseModel) -> Path:
    """Where stage i's model checkpoint lives."""
    d = stage_dir(out, i, cfg)
    return d / "model" if kind_of(cfg) == "train" else d


def _diff(old: dict, new: dict) -> str:
    a = yaml.safe_dump(old, sort_keys=False).splitlines()
    b = yaml.safe_dump(new, sort_keys=False).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "checkpointed recipe", "this recipe", lineterm=""))


def prepare_output(out: Path, recipe: Recipe, text: str, resume: bool, overwrite: bool) -> dict:
    """Start a new run in `out`, or load the state of the run to resume (same recipe only).

    A new run's recipe.yaml and state.json are written into a hidden directory beside `out`, which
    then takes its place (`atomic_dir`): a run directory always holds both, and `--overwrite`
    deletes the old run only once the new one is in place."""
    if resume and overwrite:
        raise RecipeError(
            "--resume continues the run in the output directory and --overwrite starts it over: "
            "pass one of them"
        )
    recover_dir(out.resolve())  # a replacement a crash interrupted: its old run is put back
    if resume:
        return _resumable(out, recipe, text)
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    if not fresh and not overwrite:
        raise RecipeError(
            f"output {out} exists and is not empty; pass --resume to continue its run or "
            "--overwrite to start over"
        )
    if not fresh and not is_run_dir(out):
        raise RecipeError(
            f"--overwrite: {out} is not a tinyllm run directory (no {STATE} and recipe.yaml), "
            "so tinyllm will not delete it; remove it yourself or choose another -o DIR"
        )
    real = out.resolve()  # through a symlink, replace the directory it points to
    try:
        with atomic_dir(real) as new:  # the old run goes only once the new one is in place
            return _start(new, recipe, text)
    except OSError as exc:
        raise RecipeError(
            f"cannot write the new run into {out} ({exc.strerror or exc}); free space or "
            "choose another -o DIR"
        ) from exc


def _start(out: Path, recipe: Recipe, text: str) -> dict:
    """Write a new run's recipe.yaml and state.json into `out`."""
    write_text_atomic(out / RECIPE, text)
    state = {"recipe": recipe.normalized(), "source": recipe.source, "original": None}
    state.update(stages=[], exports=[], finished=False, versions=_versions())
    write_json_atomic(out / STATE, state)
    return state


def _resumable(out: Path, recipe: Recipe, text: str) -> dict:
    """The state of the run in `out`, checked against `recipe` and the stage checkpoints; a
    changed recipe is adopted from its first changed stage on (`_adopt`)."""
    if not (out / STATE).is_file():
        raise RecipeError(f"--resume: {out} holds no run to continue (no {STATE})")
    state = read_state(out)
    old, new = state["recipe"], recipe.normalized()
    no_gates = {"stages": [[] for _ in old.get("stages", [])], "final": []}
    old.setdefault("gates", no_gates)  # a run started before recipes had gates
    if _inputs(old) != _inputs(new):
        raise RecipeError(
            f"--resume: the recipe's model, calibration or evaluation changed since {out} was "
            "checkpointed, and every stage depends on them; run it into a new directory, or "
            f"undo the change:\n{_diff(_inputs(old), _inputs(new))}"
        )
    done = len(state["stages"])
    if done > len(old.get("stages", [])):
        raise CorruptStateError(
            f"{out / STATE} lists more finished stages than its recipe has; start the run over "
            "with --overwrite"
        )
    same = _same_prefix(old.get("stages", []), new["stages"])
    keep = min(done, same)
    if keep:
        last = model_dir(out, keep - 1, recipe.stages[keep - 1])
        if not weight_files(last):
            raise RecipeError(
                f"--resume: {STATE} says stage {keep} finished, but its checkpoint {last} is "
                "missing; start the run over with --overwrite"
            )
    if old != new:
        _adopt(out, state, recipe, text, same)
    return state


def _inputs(normalized: dict) -> dict:
    """What every stage depends on: the model, calibration and evaluation (defaults filled in, so
    a setting added to tinyllm since the run started does not count as a change)."""
    return {
        "model": normalized.get("model"),
        "calibration": {**Calibration().model_dump(), **normalized.get("calibration", {})},
        "evaluation": {**Evaluation().model_dump(), **normalized.get("evaluation", {})},
    }


def _same_prefix(old: list, new: list) -> int:
    """How many leading stages the two recipes share."""
    n = 0
    while n < min(len(old), len(new)) and old[n] == new[n]:
        n += 1
    return n


def _adopt(out: Path, state: dict, recipe: Recipe, text: str, same: int) -> None:
    """Continue the run in `out` with the changed `recipe`, whose first `same` stages are those
    of the run: their records and directories stay, later ones go (they are run again), and so do
    the exports when a stage or the export list changed. Gates are checked again by the run."""
    old = state["recipe"]
    dropped = state["stages"][same:]
    state["stages"] = state["stages"][:same]
    for d in sorted((out / "stages").glob("[0-9][0-9]-*")):
        if int(d.name[:2]) > same:  # a changed stage: a training stage must not resume
            shutil.rmtree(d)
    if (
        dropped
        or len(recipe.stages) != len(old.get("stages", []))
        or (old.get("export") != [e.model_dump() for e in recipe.exports])
    ):
        state["exports"] = []
        shutil.rmtree(out / "export", ignore_errors=True)
    if dropped:
        log.warning(
            "recipe changed at stage %d: %d stage(s) kept, the rest run again", same + 1, same
        )
    else:
        log.warning("recipe changed after the finished stages: checking the gates again")
    state.update(recipe=recipe.normalized(), source=recipe.source, finished=False)
    state["final_gates"] = None
    write_text_atomic(out / RECIPE, text)
    write_json_atomic(out / STATE, state)


def _versions() -> dict[str, str]:
    import platform

    import transformers

    from tinyllm.util.version import __version__

    return {
        "tinyllm": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


class Runner:
    """Runs one recipe into one output directory."""

    def __init__(self, recipe: Recipe, out: Path, state: dict, on_stage: Callable | None = None):
        from tinyllm.core.load import load, too_big

        self.recipe, self.out, self.state = recipe, Path(out), state
        self.on_stage = on_stage or (lambda record: None)
        self.device = run_device(recipe)  # every stage and every score computes there
        # a model whose float32 weights would not fit comfortably is scored lean (bf16 or its
        # packed codes, as `tinyllm eval` loads it) and not held while a stage compresses it
        self.large = self.device == "cpu" and too_big(recipe.model)
        self._original, self.tokenizer = load(recipe.model, inference=self.large)
        self._calib: torch.Tensor | None = None

    @property
    def original(self) -> nn.Module:
        """The original model (the reference of every score), loaded again if a stage let it go."""
        from tinyllm.core.load import load

        if self._original is None:
            self._original = load(self.recipe.model, inference=self.large)[0]
        return self._original

    def save_state(self) -> None:
        write_json_atomic(self.out / STATE, self.state)

    def calib(self) -> torch.Tensor:
        from tinyllm.data.calibration import calibration_windows

        if self._calib is None:
            c = self.recipe.calibration
            self._calib = calibration_windows(
                self.tokenizer, c.corpus, c.samples, c.seq_len, c.seed
            )
        return self._calib

    def score(self, model: nn.Module, name: str, reference: bool = True) -> dict:
        from tinyllm.eval.evaluate import evaluate

        e = self.recipe.evaluation
        ref = (self.original, self.tokenizer) if reference else None
        result = evaluate(
            model,
            self.tokenizer,
            corpus=e.corpus,
            seq_len=e.seq_len,
            windows=e.windows,
            reference=ref,
            name=name,
            device=self.device,
            tasks=e.tasks,
            task_limit=e.task_limit,
        )
        return result.to_dict()

    def run(self) -> dict:
        if self.state["original"] is None:
            log.info("scoring the original model %s", self.recipe.model)
            self.state["original"] = {"eval": self.score(self.original, self.recipe.model, False)}
            self.save_state()
        self.state["stopped"] = None
        for i, cfg in enumerate(self.recipe.stages):
            if i < len(self.state["stages"]):  # finished before a resume: its gates again
                self.check_stage(i, self.state["stages"][i])
                continue
            record = self.run_stage(i, cfg)
            record["gates"] = self.gate_results(self.recipe.gates_of(i), record["eval"])
            self.state["stages"].append(record)
            self.save_state()
            self.on_stage(record)
            self.check_stage(i, record)
        self.check_final()
        self.run_exports()
        self.state["finished"] = True
        self.save_state()
        from tinyllm.pipeline.report import write_report

        write_report(self.out, self.state)
        return self.state

    def gate_results(self, gates: list, result: dict) -> list[dict]:
        """`gates` checked on `result`, relative ones against the original's scores."""
        return [r.to_dict() for r in check_gates(result, gates, self.state["original"]["eval"])]

    def check_stage(self, i: int, record: dict) -> None:
        """Stage i's gates (checked again: the recipe may have changed them); a failed one stops
        the run."""
        record["gates"] = self.gate_results(self.recipe.gates_of(i), record["eval"])
        self.save_state()
        if any(not g["passed"] for g in record["gates"]):
            where = self.out / record["dir"]
            self.stop(f"stage {i + 1} ({record['type']}) failed its gates", record["gates"], where)

    def check_final(self) -> None:
        """The recipe's final gates on the last stage (the original when there is none), before
        anything is exported."""
        last = self.state["stages"][-1] if self.state["stages"] else self.state["original"]
        self.state["final_gates"] = self.gate_results(self.recipe.gates, last["eval"])
        self.save_state()
        write_gates_junit(self.out, self.state)
        if any(not g["passed"] for g in self.state["final_gates"]):
            where = self.out / last["dir"] if "dir" in last else self.recipe.model
            self.stop("the finished model failed the final gates", self.state["final_gates"], where)

    def stop(self, what: str, gates: list[dict], model: Path | str) -> None:
        """Record why the run stops, write the report and gates.xml; raise StageGateError."""
        from tinyllm.eval.gates import GateResult
        from tinyllm.pipeline.report import write_report

        results = [GateResult(**g) for g in gates]
        message = (
            f"{what}: {summary(results)}. The run stopped there (the model: {model}; "
            f"{self.out / 'report.md'} marks the gate). Change the stage or its gates in the "
            f"recipe, then continue with `tinyllm run RECIPE -o {self.out} --resume`"
        )
        self.state["stopped"] = message
        self.save_state()
        write_gates_junit(self.out, self.state)
        write_report(self.out, self.state)
        raise StageGateError(message, self.state)

    def source(self, i: int) -> str:
        """The model stage i starts from."""
        if i == 0:
            return self.recipe.model
        return str(model_dir(self.out, i - 1, self.recipe.stages[i - 1]))

    def run_stage(self, i: int, cfg: BaseModel) -> dict:
        from tinyllm.core.load import load
        from tinyllm.util.memory import PeakRSS, trim_heap

        name, kind = stage_name(cfg), kind_of(cfg)
        log.info("stage %d/%d: %s", i + 1, len(self.recipe.stages), name)
        if self.large:
            self._original = None  # the stage gets the memory; scoring loads it again
            trim_heap()
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            report = self.train(i, cfg) if kind == "train" else self.compress(i, cfg)
        seconds = time.perf_counter() - t0
        where = model_dir(self.out, i, cfg)
        self.original  # noqa: B018 (loaded again first: its load's transient copy meets no stage model)
        model, _ = load(where, inference=self.large)
        return {
            "index": i + 1,
            "type": name,
            "kind": kind,
            "config": cfg.model_dump(),
            "settings": cfg.model_dump(exclude_unset=True),  # what the recipe set
            "dir": str(where.relative_to(self.out)),
            "seconds": seconds,
            "peak_rss_bytes": mem.peak,
            "weights_bytes": sum(f.stat().st_size for f in weight_files(where)),
            "report": report,
            "eval": self.score(model, f"stage {i + 1}: {name}"),
        }

    def compress(self, i: int, cfg: BaseModel) -> dict:
        """Stage i through `core.compress`, as `tinyllm quantize` / `prune` run it."""
        from tinyllm.core.compress import compress

        result = compress(
            self.source(i),
            [cfg],
            self.recipe.calibration,
            stage_dir(self.out, i, cfg),
            overwrite=True,
            device=self.device,
            stream=self.recipe.stream,
        )
        return {k: v for k, v in result.report.items() if k != "seconds"}

    def train(self, i: int, cfg: BaseModel) -> dict:
        """A training stage: its trainer state in the stage directory, the model in model/;
        a stage killed midway resumes from its checkpoint/."""
        from tinyllm.core.compress import compress
        from tinyllm.distill.trainer import CHECKPOINT

        d = stage_dir(self.out, i, cfg)
        result = compress(
            self.source(i),
            [cfg],
            self.recipe.calibration,
            d / "model",
            overwrite=True,
            teacher=self.recipe.model,
            train_dir=d,
            resume=(d / CHECKPOINT).is_dir(),
            device=self.device,
        )
        return {k: v for k, v in result.report.items() if k != "seconds"}

    def run_exports(self) -> None:
        """Write the exports, score each file through its own runtime (once: a resumed run keeps
        the scores), then check the final gates on those scores."""
        if len(self.state["exports"]) != len(self.recipe.exports):
            self.write_exports()
        for record in self.state["exports"]:
            if "eval" not in record:
                record["eval"] = self.score_export(record)
                self.save_state()
        for i, record in enumerate(self.state["exports"]):
            self.check_export(i, record)

    def score_export(self, record: dict) -> dict:
        """An exported file scored as the stages are, through the runtime that reads it: the
        evaluation windows against the original, and the evaluation's tasks. A runtime that is
        not installed or cannot read the file gives {"not_scored": why}, not an error."""
        from tinyllm.eval.evaluate import evaluation_windows
        from tinyllm.eval.tasks import run_tasks
        from tinyllm.export.scoring import RUNTIMES, open_backend, score_windows

        e, runtime = self.recipe.evaluation, RUNTIMES.get(record["format"], record["format"])
        log.info("scoring export %s through %s", record["path"], runtime)
        try:
            lm = open_backend(record["format"], self.out / record["path"], self.tokenizer)
            windows, _ = evaluation_windows(self.tokenizer, e.corpus, e.seq_len, e.windows)
            result = {"runtime": runtime, "size_bytes": record["bytes"]}
            result.update(score_windows(lm, windows, self.original))
            if e.tasks:
                result["tasks"] = run_tasks(lm, e.tasks, e.task_limit)
        except TinyLLMError as exc:
            log.warning("export %s not scored: %s", record["path"], exc)
            return {"runtime": runtime, "not_scored": str(exc)}
        except Exception as exc:  # the runtime broke on this file: the run and its stages stand
            log.exception("export %s: %s failed while scoring it", record["path"], runtime)
            why = f"{runtime} failed while scoring: {type(exc).__name__}: {exc}"
            return {"runtime": runtime, "not_scored": why}
        return result

    def check_export(self, i: int, record: dict) -> None:
        """The final gates on an exported file's own scores (the gates on what a file holds:
        quality, size and tasks); a failed one stops the run. A file not scored is not gated."""
        gates = [g for g in self.recipe.gates if g.metric.partition(":")[0] in EXPORT_METRICS]
        if "not_scored" in record["eval"] or not gates:
            record["gates"] = None
            return
        record["gates"] = self.gate_results(gates, record["eval"])
        self.save_state()
        write_gates_junit(self.out, self.state)
        if any(not g["passed"] for g in record["gates"]):
            from tinyllm.pipeline.report import export_label

            what = f"export {i + 1} ({export_label(record)}) failed the final gates"
            self.stop(what, record["gates"], self.out / record["path"])

    def write_exports(self) -> None:
        """Each export of the last stage's model; a GGUF one streams block by block under the
        recipe's `stream:` (auto: a model too big to load whole), the others load it whole."""
        from tinyllm.export import export_model
        from tinyllm.util.fs import dir_size

        last = self.source(len(self.recipe.stages))
        self.state["exports"] = []
        for e in self.recipe.exports:
            path = self.out / "export" / _export_name(e)
            path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            stream = self.recipe.stream if e.format == "gguf" else "off"
            export_model(last, path, e.format, e.type, True, e.strict, stream)
            size = dir_size(path) if path.is_dir() else _file_size(path)
            self.state["exports"].append(
                {
                    **e.model_dump(),
                    "path": str(path.relative_to(self.out)),
                    "bytes": size,
                    "seconds": time.perf_counter() - t0,
                }
            )
            self.save_state()


def write_gates_junit(out: Path, state: dict) -> None:
    """OUTPUT/gates.xml: one JUnit suite per stage with gates, and one for the final gates."""
    from tinyllm.eval.gates import GateResult

    suites = {
        f"stage {s['index']}: {s['type']}": [GateResult(**g) for g in s.get("gates") or []]
        for s in state["stages"]
        if s.get("gates")
    }
    if state.get("final_gates"):
        suites["final"] = [GateResult(**g) for g in state["final_gates"]]
    for x in state.get("exports") or []:
        if x.get("gates"):
            suites[f"export {x['path']}"] = [GateResult(**g) for g in x["gates"]]
    if suites:
        write_junit_suites(out / JUNIT, suites)


def _file_size(path: Path) -> int:
    extra = path.with_name(path.name + ".data")  # ONNX external weights
    return path.stat().st_size + (extra.stat().st_size if extra.is_file() else 0)


def _export_name(e: Any) -> str:
    from tinyllm.export import DEFAULT_TYPES

    qtype = e.type or DEFAULT_TYPES.get(e.format) or "default"
    return {"gguf": f"model-{qtype}.gguf", "onnx": f"model-{qtype}.onnx", "hf": f"hf-{qtype}"}[
        e.format
    ]


def _check_tasks(recipe: Recipe) -> None:
    """The evaluation's task names exist (a RecipeError naming the choices otherwise)."""
    from tinyllm.eval.tasks import check_task_names

    try:
        check_task_names(recipe.evaluation.tasks)
    except TinyLLMError as exc:
        raise RecipeError(f"{recipe.source}, field evaluation.tasks: {exc}") from exc


def run_device(recipe: Recipe) -> str:
    """The recipe's `device:` on this machine ('cpu', 'cuda', 'cuda:1'); a GPU asked for where
    there is none is a RecipeError."""
    from tinyllm.util.device import resolve_device

    try:
        return str(resolve_device(recipe.device))
    except TinyLLMError as exc:
        raise RecipeError(f"{recipe.source}, field device: {exc}") from exc


def run_recipe(
    recipe: Recipe,
    text: str,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    on_stage: Callable | None = None,
) -> dict:
    """Run `recipe` (its YAML `text` is kept beside the results) into `out`; returns the state."""
    from tinyllm.models.load import resolve

    out = Path(out)
    for w in recipe.warnings:
        log.warning(w)
    try:
        resolve(recipe.model)  # a missing model fails before anything is written
    except TinyLLMError as exc:
        raise RecipeError(f"{recipe.source}: model: {exc}") from exc
    run_device(recipe)  # and so does a GPU this machine does not have
    _check_tasks(recipe)  # and a task that does not exist
    with locked(out):
        state = prepare_output(out, recipe, text, resume, overwrite)
        return Runner(recipe, out, state, on_stage).run()
