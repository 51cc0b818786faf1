"""`compress(source, steps, calibration, out)`: the one path from a model to a checkpoint.

It loads the model, draws calibration windows when a step needs them, runs the steps in order,
rounds the tensors left in float, and writes the checkpoint with its metadata (the source, every
step including those a tinyllm source already went through, the calibration actually used,
seconds). The CLI commands (quantize, prune, distill) and the recipe runner all call it, so the
same settings give byte-identical checkpoints whichever way they are run.

    result = compress("smollm2-135m", [Wanda(sparsity=0.5), GPTQ(bits=4)], Calibration(), "out")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tinyllm.core.placement import OFFLOAD_MODES, Placement, Streaming, placed
from tinyllm.core.registry import STREAMS, kind_of, name_of
from tinyllm.core.resume import JOURNAL, RESUMABLE, Journal, fingerprint
from tinyllm.core.steps import Context, Step, TrainSetup, apply_step, fit_batch
from tinyllm.errors import ConfigError
from tinyllm.util import dist
from tinyllm.util.device import resolve_device
from tinyllm.util.memory import peak_rss_bytes

log = logging.getLogger(__name__)

FLOAT_DTYPES = ("float16", "float32")
# The report file of a checkpoint, by the kind of its last step.
REPORT_FILES = {"quantize": "quant_report.json", "prune": "prune_report.json"}
REPORT_FILES["train"] = "train_report.json"


class Calibration(BaseModel):
    """Where calibration windows come from and the precision of calibration forwards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: str = "enwiki"
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"  # calibration forwards


@dataclass
class CompressResult:
    """What `compress` made: the model (in memory), its report and the metadata it wrote."""

    model: nn.Module
    tokenizer: Any
    report: dict[str, Any]
    meta: dict[str, Any]
    out: Path | None = None
    steps: list[Step] = field(default_factory=list)


def compress(
    source: str | Path,
    steps: Sequence[Step],
    calibration: Calibration | None = None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    float_dtype: str = "float16",
    teacher: str | None = None,
    train_dir: str | Path | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    device: str = "cpu",
    stream: str = "auto",
    offload: str = "auto",
) -> CompressResult:
    """Load `source`, run `steps` in order, round floats to `float_dtype`, save to `out`.

    Training steps (distill, recover, movement, imp) learn from `teacher` (default: the source)
    and keep their trainer state in `train_dir` (default: `<out>.train`), which `resume`
    continues. `meta` adds fields to the checkpoint's tinyllm.json. `device` (auto, cpu,
    cuda[:N]) is where blocks are computed; the model itself stays in CPU memory. `stream`
    ("auto", "on", "off"): read, compress and write one block at a time (core/stream.py); auto
    streams a model whose float32 weights would not fit comfortably in memory. `offload`
    ("auto", "on", "off"): keep the calibration activations in CPU memory while blocks compute
    on a GPU (auto: when the GPU's free memory is short for them; core.placement)."""
    from tinyllm.checkpoint import check_output_dir, round_floats
    from tinyllm.core.load import load

    steps, calibration = list(steps), calibration or Calibration()
    _check(steps, float_dtype)
    if offload not in OFFLOAD_MODES:
        raise ConfigError(f"unknown offload '{offload}'; choose one of {', '.join(OFFLOAD_MODES)}")
    if out is not None:
        check_output_dir(Path(out), overwrite or resume)  # fail before the slow part
    resolve_device(device)  # a GPU this machine lacks fails before the slow part
    directory = _stream_source(source, steps, stream)
    if directory is not None:
        settings = {"float_dtype": float_dtype, "meta": meta, "resume": resume}
        settings["offload"] = offload
        return _compress_streamed(directory, source, steps, calibration, out, device, settings)
    model, tok = load(source)
    ctx = _context(steps, tok, calibration)
    ctx.device = resolve_device(device)
    if any(kind_of(cfg) == "train" for cfg in steps):
        workdir = _train_dir(out, train_dir)
        ctx.train = _train_setup(str(source), teacher, tok, workdir, resume, overwrite)
    t0 = time.perf_counter()
    with placed(Placement(ctx.device, offload)):
        report = run_steps(model, steps, ctx)
    report["seconds"] = time.perf_counter() - t0
    round_floats(model, getattr(torch, float_dtype))
    info = _meta(source, steps, calibration, ctx, report, float_dtype)
    info.update({"teacher": ctx.train.specs["teacher"]} if ctx.train is not None else {})
    info.update(report.pop("checkpoint_meta", {}), **(meta or {}))
    result = CompressResult(model, tok, report, info, None, steps)
    if out is not None and _rank() == 0:
        result.out = _save(model, tok, Path(out), info, report, steps, overwrite or resume)
    return result


STREAM_MODES = ("auto", "on", "off")


def _stream_source(source: str | Path, steps: list[Step], mode: str) -> Path | None:
    """The directory to stream from (a Hugging Face model or a float tinyllm checkpoint), or
    None to load the model whole."""
    from tinyllm.checkpoint import read_info
    from tinyllm.core.stream import should_stream
    from tinyllm.models.load import hf_directory, resolve

    if mode not in STREAM_MODES:
        raise ConfigError(f"stream must be one of {', '.join(STREAM_MODES)}, got '{mode}'")
    if mode == "off":
        return None
    refused = [name_of(cfg) for cfg in steps if name_of(cfg) not in STREAMS]
    reasons = [f"{name_of(cfg)}: {cfg.whole_model()}" for cfg in steps if cfg.whole_model()]
    r = resolve(source)
    packed = r.kind == "tinyllm_dir" and bool(read_info(r.path).quantized)
    if refused or reasons or packed:
        if mode == "on":
            why = f"{', '.join(refused)} need(s) the whole model" if refused else "; ".join(reasons)
            why = why or f"{source} is quantized (streaming starts from float or pruned weights)"
            raise ConfigError(
                f"cannot stream: {why}; streaming runs {', '.join(sorted(STREAMS))} on a "
                "Hugging Face model, a registered name or a float tinyllm checkpoint (use "
                "--stream off)"
            )
        return None
    directory = r.path if r.kind == "tinyllm_dir" else hf_directory(source)
    return directory if should_stream(directory, mode) else None


def _compress_streamed(
    directory: Path,
    source: str | Path,
    steps: list[Step],
    calibration: Calibration,
    out: str | Path | None,
    device: str,
    settings: dict[str, Any],
) -> CompressResult:
    """compress() for a model read, compressed and written one block at a time. The work
    directory keeps the finished blocks and the progress record (core/resume.py) until the
    output is written: `settings["resume"]` continues an interrupted run from there."""
    import shutil

    from tinyllm.core.stream import open_streamed, save_streamed

    model, tok, weights, tied = open_streamed(directory)
    ctx = _context(steps, tok, calibration)
    ctx.device = resolve_device(device)
    work = Path(f"{out or directory / 'tinyllm'}.stream{_rank()}")
    journal = _journal(work, source, steps, ctx, settings["resume"])
    where = Streaming(
        model, weights, work, ctx.device, tied=tied, journal=journal, offload=settings["offload"]
    )
    try:
        with placed(where):
            t0 = time.perf_counter()
            report = run_steps(model, steps, ctx, report_to=where if journal else None)
            report["seconds"] = time.perf_counter() - t0
            info = _meta(source, steps, calibration, ctx, report, settings["float_dtype"])
            info.update(report.pop("checkpoint_meta", {}), **(settings["meta"] or {}), stream=True)
            result = CompressResult(model, tok, report, info, None, steps)
            if out is not None and _rank() == 0:
                files = _report_files(report, steps)
                dtype = getattr(torch, settings["float_dtype"])
                result.out = save_streamed(model, tok, where, Path(out), info, files, dtype, tied)
    except BaseException:
        if journal is not None and (work / JOURNAL).is_file():
            log.warning("the finished blocks are kept in %s: run the same command with "
                        "--resume to continue from there", work)  # fmt: skip
        else:
            shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return result


def _journal(
    work: Path, source: str | Path, steps: list[Step], ctx: Context, resume: bool
) -> Journal | None:
    """The progress record of a streamed run that can resume (one step of a RESUMABLE
    method, one process), read back when `resume` asks for it; None for other runs. A run
    that does not resume starts from an empty work directory."""
    import shutil

    can = len(steps) == 1 and name_of(steps[0]) in RESUMABLE and dist.world() == 1
    how = [str(source), ctx.batch_size, ctx.calib_dtype, str(ctx.device)]
    journal = Journal(work, fingerprint(how, steps, ctx.calib))
    if resume and can and journal.load() is not None:
        log.info("resuming from block %d (%s)", journal.state["done"], work)
        return journal
    if resume:
        why = "nothing recorded" if can else "only one-step gptq, awq, rtn or nf4 runs resume"
        log.warning("--resume: starting the streamed run from block 0 (%s)", why)
    shutil.rmtree(work, ignore_errors=True)
    return journal if can else None


def _check(steps: list[Step], float_dtype: str) -> None:
    if not steps:
        raise ConfigError("compress: give at least one step")
    for cfg in steps:
        kind_of(cfg)  # registered, or a ConfigError naming core/registry.py
    if float_dtype not in FLOAT_DTYPES:
        raise ConfigError(f"float_dtype must be float16 or float32, got '{float_dtype}'")


def _context(steps: list[Step], tok: Any, calibration: Calibration) -> Context:
    """A context with calibration windows if a step needs them."""
    ctx = Context(calib_dtype=calibration.dtype)
    if any(cfg.calibrated for cfg in steps):
        from tinyllm.data.calibration import calibration_windows
        from tinyllm.util.dist import shard

        c = calibration
        # under torchrun each process calibrates on its share (util.dist: statistics reduced)
        ctx.calib = shard(calibration_windows(tok, c.corpus, c.samples, c.seq_len, c.seed))
        ctx.batch_size = fit_batch(ctx.calib, ctx.batch_size)
    return ctx


def _train_setup(
    source: str, teacher: str | None, tok: Any, workdir: Path, resume: bool, overwrite: bool
) -> TrainSetup:
    """The teacher (by default a fresh copy of the source) and where the trainer writes."""
    from tinyllm.core.load import load

    t_model, t_tok = load(teacher or source)
    specs = {"source": source, "teacher": teacher or source}
    return TrainSetup(t_model, t_tok, tok, workdir, resume, overwrite, specs)


def _train_dir(out: str | Path | None, train_dir: str | Path | None) -> Path:
    if train_dir is not None:
        return Path(train_dir)
    if out is None:
        raise ConfigError("a training step needs train_dir (or out) for its trainer state")
    return Path(str(out) + ".train")


def run_steps(
    model: nn.Module, steps: list[Step], ctx: Context, report_to: Placement | None = None
) -> dict[str, Any]:
    """Apply each step in place with its own report; the reports merged (dicts joined).
    `report_to`: a placement that records each step's report as it grows (core/resume.py)."""
    report: dict[str, Any] = {}
    for cfg in steps:
        log.info("applying %s", cfg)
        if kind_of(cfg) == "prune":
            _check_float(model, cfg)
        one = Context(**{**ctx.__dict__, "report": {}, "layer_bits": {}})
        if report_to is not None:
            report_to.report = one.report
        apply_step(model, cfg, one)
        for key, value in one.report.items():
            old = report.get(key)
            report[key] = {**old, **value} if isinstance(old, dict) else value
    return report


def _check_float(model: nn.Module, cfg: Step) -> None:
    """Pruners work on float weights: refuse a quantized model."""
    if any(getattr(m, "qweight", None) is not None for m in model.modules()):
        raise ConfigError(
            f"{cfg.describe()['type']}: this model is already quantized: prune the float model "
            "first, then quantize (distill -> prune -> quantize)"
        )


def _meta(
    source: str | Path,
    steps: list[Step],
    calibration: Calibration,
    ctx: Context,
    report: dict,
    float_dtype: str,
) -> dict[str, Any]:
    """The checkpoint metadata: source, every step, the calibration used, measurements."""
    from tinyllm.checkpoint import prior_steps

    used = None
    if ctx.calib is not None:
        used = {**calibration.model_dump(), "dtype": report.get("calib_dtype", calibration.dtype)}
    return {
        "float_dtype": float_dtype,
        "peak_rss_bytes": peak_rss_bytes(),
        "source": str(source),
        "steps": [*prior_steps(source), *(cfg.describe() for cfg in steps)],
        "seconds": report["seconds"],
        "calibration": used,
    }


def _report_files(report: dict, steps: list[Step]) -> dict[str, Any]:
    """The report files beside the weights: per-layer errors, the last step's report."""
    extra: dict[str, Any] = {}
    if report.get("layer_errors"):
        extra["layer_errors.json"] = report["layer_errors"]
    rest = {k: v for k, v in report.items() if k != "layer_errors"}
    extra[REPORT_FILES[kind_of(steps[-1])]] = rest
    return extra


def _save(
    model: nn.Module,
    tok: Any,
    out: Path,
    meta: dict,
    report: dict,
    steps: list[Step],
    overwrite: bool,
) -> Path:
    from tinyllm.checkpoint import save_checkpoint

    extra = _report_files(report, steps)
    return save_checkpoint(model, tok, out, meta, overwrite=overwrite, extra_files=extra)


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 writes."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
