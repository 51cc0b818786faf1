"""`tinyllm quantize`, `prune` and `distill`: make a compressed checkpoint.

Each command parses its options into step configs and calls `tinyllm.core.compress.compress`,
the same function the recipe runner calls. Options the user did not set are the command's
defaults; an option the user set that the chosen method does not use is an error naming the
method's real options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tinyllm.cli import compress_options as opts_
from tinyllm.cli._common import (
    CalibCorpusOpt,
    CalibDtypeOpt,
    DeviceOpt,
    ModelArg,
    OffloadOpt,
    OutputDirOpt,
    OverwriteOpt,
    SamplesOpt,
    SeedOpt,
    SeqLenOpt,
    StreamOpt,
    StreamResumeOpt,
    _check_calib_dtype,
    device_of,
    flag_of,
    given_options,
    help_text,
    out,
)
from tinyllm.cli.app import app
from tinyllm.errors import ConfigError

Q, P, D = opts_.Quant, opts_.Prune, opts_.Distill

CALIB = ("calib_corpus", "samples", "seq_len", "seed", "calib_dtype")
QUANT_GENERAL = {
    "model", "output", "method", "overwrite", "float_dtype", "device", "stream", "offload"
}  # fmt: skip
QUANT_GENERAL |= {"resume"}
QUANT_GENERAL |= set(CALIB)
QUANT_GENERAL |= {"gguf_compatible", "embed_bits"}
QUANT_FIELD = {"alpha_search": "search", "fp8_format": "format"}  # option -> step field
PRUNE_GENERAL = {"model", "output", "method", "overwrite", "device", "stream", "offload", *CALIB}


@app.command(help=help_text(opts_.QUANTIZE_HELP))
def quantize(
    ctx: typer.Context,
    model: ModelArg,
    output: OutputDirOpt,
    method: Q.Method = "gptq",
    base: Q.Base = "rtn",
    bits: Q.Bits = 4,
    group_size: Q.GroupSize = 64,
    sym: Q.Sym = False,
    mse: Q.Mse = True,
    act_order: Q.ActOrder = True,
    static_groups: Q.StaticGroups = True,
    damp: Q.Damp = 0.01,
    float_targets: Q.FloatTargets = 0.0,
    true_sequential: Q.TrueSequential = None,
    weighted_grid: Q.WeightedGrid = True,
    refit_scales: Q.RefitScales = 0,
    clip: Q.Clip = True,
    base_search: Q.BaseSearch = False,
    gguf_compatible: Q.GgufCompatible = None,
    embed_bits: Q.EmbedBits = None,
    activations: Q.Activations = "",
    observer: Q.Observer = "minmax",
    granularity: Q.Granularity = "tensor",
    percentile: Q.Percentile = 99.99,
    act_sym: Q.ActSym = True,
    alpha: Q.Alpha = None,
    alpha_search: Q.AlphaSearch = "layer",
    fp8_format: Q.Fp8Format = "e4m3",
    avg_bits: Q.AvgBits = None,
    size_mb: Q.SizeMb = None,
    candidate_bits: Q.CandidateBits = "3,4,8",
    candidate_types: Q.CandidateTypes = "",
    target_bpw: Q.TargetBpw = None,
    sensitivity_cache: Q.SensitivityCache = None,
    sensitivity: Q.Sensitivity = "kld",
    layout_from: Q.LayoutFrom = None,
    calib_corpus: CalibCorpusOpt = "enwiki",
    samples: SamplesOpt = 128,
    seq_len: SeqLenOpt = 512,
    seed: SeedOpt = 0,
    calib_dtype: CalibDtypeOpt = "float32",
    overwrite: OverwriteOpt = False,
    float_dtype: Q.FloatDtype = "float16",
    device: DeviceOpt = "auto",
    stream: StreamOpt = "auto",
    resume: StreamResumeOpt = False,
    offload: OffloadOpt = "auto",
) -> None:
    from tinyllm.core.compress import compress

    opts = {k: v for k, v in locals().items() if k != "ctx"}
    steps = quant_steps(ctx, opts)
    meta = {"gguf_compatible": gguf_compatible} if gguf_compatible else None
    result = compress(
        model, steps, calibration(opts), output,
        overwrite=overwrite, float_dtype=float_dtype, meta=meta, device=device_of(device),
        stream=stream, resume=resume, offload=offload,
    )  # fmt: skip
    print_quant_report(result.report, method, output)


def quant_steps(ctx: typer.Context, opts: dict[str, Any]) -> list:
    """The quantization step (and the embeddings step of --embed-bits) from the options."""
    from tinyllm.quant.api import quant_step, step_classes, step_fields

    method, base = opts["method"], opts["base"]
    if method not in step_classes():
        raise ConfigError(f"unknown method '{method}'; choose one of {', '.join(step_classes())}")
    check_given(ctx, method, QUANT_GENERAL, step_fields(method, base), QUANT_FIELD)
    options = {QUANT_FIELD.get(k, k): v for k, v in opts.items()}
    if not opts["activations"]:
        del options["activations"]
    options["candidate_bits"] = _widths(opts["candidate_bits"])
    options["candidate_types"] = [t.strip() for t in opts["candidate_types"].split(",")]
    options["candidate_types"] = [t for t in options["candidate_types"] if t]
    if opts.get("layout_from") is not None:
        options["allocation"] = _layout(opts["model"], opts["layout_from"])
        options["candidate_types"] = sorted(set(options["allocation"].values()))
    if opts["gguf_compatible"] is not None:
        options.update(_gguf_grid(method, opts["gguf_compatible"]))
    steps = [quant_step(method, options, base, field_flag(ctx, QUANT_FIELD))]
    if opts["embed_bits"] is not None:
        from tinyllm.quant.embed import embed_step

        try:
            steps.append(embed_step(opts["embed_bits"]))
        except ValueError as exc:
            raise ConfigError(f"--embed-bits: {_first_line(exc)}") from None
    return steps


def check_given(
    ctx: typer.Context, method: str, general: set[str], fields: set[str], rename: dict
) -> None:
    """An option the user set that `method` does not use is an error naming its options."""
    used = [p.name for p in ctx.command.params if rename.get(p.name, p.name) in fields]
    stray = [n for n in given_options(ctx) if n not in general and n not in used]
    if not stray:
        return
    takes = ", ".join(flag_of(ctx, n) for n in used if n not in general) or "no method options"
    raise ConfigError(
        f"{flag_of(ctx, stray[0])} does not apply to --method {method}; {method} takes {takes}"
    )


def field_flag(ctx: typer.Context, rename: dict[str, str]):
    """Step field -> 'field (--flag)' for error messages."""
    back = {v: k for k, v in rename.items()}

    def flag(field: str) -> str:
        name = back.get(field, field)
        known = any(p.name == name for p in ctx.command.params)
        return f"{field} ({flag_of(ctx, name)})" if known else field

    return flag


def calibration(opts: dict[str, Any]):
    """The calibration settings of the --calib-* options."""
    from pydantic import ValidationError

    from tinyllm.core.compress import Calibration

    _check_calib_dtype(opts["calib_dtype"])
    try:
        return Calibration(
            corpus=opts["calib_corpus"], samples=opts["samples"], seq_len=opts["seq_len"],
            seed=opts["seed"], dtype=opts["calib_dtype"],
        )  # fmt: skip
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-")
        raise ConfigError(f"{flag}: {first['msg']}") from None


def _layout(model: str, path: Path) -> dict[str, str]:
    """--layout-from: each block linear's GGUF type in the file, read against the model's
    skeleton (no weights loaded)."""
    from tinyllm.export.gguf import gguf_layout
    from tinyllm.models.load import hf_directory, load_config
    from tinyllm.models.validate import meta_model

    if not Path(path).is_file():
        raise ConfigError(f"--layout-from: {path} does not exist")
    return gguf_layout(meta_model(load_config(hf_directory(model))), Path(path))


def _widths(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--candidate-bits: comma-separated integers, got '{text}'") from None


def _gguf_grid(method: str, name: str) -> dict[str, Any]:
    """--gguf-compatible: the grid (and GPTQ static groups) of a GGUF block type."""
    from tinyllm.quant.common import CODEBOOKS, GGUF_GRID_TYPES, gguf_grid

    if method == "nf4":
        raise ConfigError("--gguf-compatible: NF4 codebooks have no GGUF block type")
    if name in CODEBOOKS and method not in ("rtn", "gptq", "awq", "mixed"):
        raise ConfigError(f"--gguf-compatible {name}: not a grid --method {method} can use")
    if name not in GGUF_GRID_TYPES:
        raise ConfigError(f"--gguf-compatible: choose one of {', '.join(GGUF_GRID_TYPES)}")
    grid = {k: v for k, v in gguf_grid(name).items() if v is not None}
    return {**grid, "static_groups": True}


def _first_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    return errors()[0]["msg"] if callable(errors) else str(exc).splitlines()[0]


def print_quant_report(report: dict[str, Any], method: str, output: Path) -> None:
    errs = list(report.get("layer_errors", {}).values())
    out.print(
        f"quantized {len(errs)} layers with {method} in {report['seconds']:.1f} s "
        f"(mean layer error {sum(errs) / max(len(errs), 1):.4g}); wrote {output}"
    )
    for key in ("activations", "simulated", "avg_bits", "bpw", "smoothquant_model_alpha"):
        if key in report:
            out.print(f"  {key.replace('_', ' ')}: {report[key]}")
    if report.get("outliers"):
        worst = max(report["outliers"].items(), key=lambda kv: kv[1]["ratio"])
        out.print(
            f"  largest input outlier ratio (max / median channel): {worst[1]['ratio']:.0f} at "
            f"{worst[0]}; see quant_report.json or `tinyllm outliers`"
        )


@app.command(help=help_text(opts_.PRUNE_HELP))
def prune(
    ctx: typer.Context,
    model: ModelArg,
    output: OutputDirOpt,
    method: P.Method = "wanda",
    sparsity: P.Sparsity = 0.5,
    pattern: P.Pattern = None,
    allocation: P.Allocation = "uniform",
    scope: P.Scope = "layer",
    count: P.Count = None,
    importance: P.Importance = "activation",
    bits: P.Bits = None,
    group_size: P.GroupSize = 128,
    sym: P.Sym = False,
    calib_corpus: CalibCorpusOpt = "enwiki",
    samples: SamplesOpt = 128,
    seq_len: SeqLenOpt = 512,
    seed: SeedOpt = 0,
    calib_dtype: CalibDtypeOpt = "float32",
    steps: P.Steps = 200,
    lr: P.Lr = 1e-4,
    rounds: P.Rounds = 3,
    rewind: P.Rewind = False,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    stream: StreamOpt = "auto",
    offload: OffloadOpt = "auto",
) -> None:
    from tinyllm.core.compress import compress
    from tinyllm.prune.api import prune_step, step_classes, step_fields, training_pruners

    opts = {k: v for k, v in locals().items() if k != "ctx"}
    if method not in {**step_classes(), **training_pruners()}:
        raise ConfigError(f"unknown method '{method}'; choose one of {P.methods()}")
    check_given(ctx, method, PRUNE_GENERAL, step_fields(method), {})
    cfg = prune_step(method, opts, field_flag(ctx, {}))
    trains = method in training_pruners()
    where = output / "model" if trains else output
    result = compress(
        model, [cfg], calibration(opts), where, overwrite=overwrite,
        train_dir=output if trains else None, device=device_of(device), stream=stream,
        offload=offload,
    )  # fmt: skip
    print_prune_report(result, method, where)


def print_prune_report(result: Any, method: str, where: Path) -> None:
    from tinyllm.models.size import param_count
    from tinyllm.models.sparsity import sparsity_of

    if "distill" in result.meta:  # a training pruner
        d, t = result.meta["distill"], result.report.get("teacher_eval", {})
        out.print(
            f"{method}: perplexity {d['before']['perplexity']:.3f} -> "
            f"{d['after']['perplexity']:.3f} (dense {t.get('perplexity', float('nan')):.3f});"
            f" wrote {where}"
        )
        return
    if result.meta.get("stream"):  # the model was never whole in memory: its layer report
        layers = result.report.get("layer_sparsity")
        c = result.model.config
        what = (
            f"mean layer sparsity {sum(layers.values()) / len(layers):.1%}"
            if layers  # structured pruning: the shapes it left
            else f"now {c.num_hidden_layers} blocks, FFN width "
            f"{getattr(c, 'intermediate_size', '?')}, {getattr(c, 'num_key_value_heads', '?')} "
            "KV heads"
        )
        out.print(
            f"pruned with {method} in {result.report['seconds']:.1f} s (streamed): {what}; "
            f"wrote {where}"
        )
        return
    out.print(
        f"pruned with {method} in {result.report['seconds']:.1f} s: sparsity "
        f"{sparsity_of(result.model):.1%} of the block linears, "
        f"{param_count(result.model):,} parameters; wrote {where}"
    )


@app.command(help=help_text(opts_.DISTILL_HELP))
def distill(
    output: OutputDirOpt,
    teacher: D.Teacher = "smollm2-135m",
    student: D.Student = None,
    layers: D.Layers = None,
    alpha: D.Alpha = 1.0,
    beta: D.Beta = 0.0,
    gamma: D.Gamma = 0.0,
    delta: D.Delta = 0.0,
    temperature: D.Temperature = 1.0,
    kd: D.Kd = "forward",
    feature: D.Feature = "mse",
    steps: D.Steps = 500,
    lr: D.Lr = 1e-4,
    scale_lr: D.ScaleLr = None,
    warmup: D.Warmup = 0.05,
    weight_decay: D.WeightDecay = 0.0,
    batch: D.Batch = 4,
    seq_len: D.SeqLen = 256,
    grad_accum: D.GradAccum = 1,
    clip: D.Clip = 1.0,
    seed: D.Seed = 0,
    corpus: D.Corpus = "enwiki",
    teacher_cache: D.TeacherCache = False,
    topk: D.Topk = 64,
    eval_every: D.EvalEvery = 100,
    eval_windows: D.EvalWindows = 8,
    eval_seq_len: D.EvalSeqLen = 512,
    final_eval_windows: D.FinalEvalWindows = 40,
    save_every: D.SaveEvery = 100,
    resume: D.Resume = False,
    overwrite: D.Overwrite = False,
    train: D.Train = "all",
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations in backward."),
    parallel: str = typer.Option("auto", help="Under torchrun: ddp, fsdp (sharded) or auto."),
    device: DeviceOpt = "auto",
) -> None:
    from tinyllm.core.compress import compress
    from tinyllm.distill.steps import Distill

    if student is None and layers is None:
        raise ConfigError("give a student: --student MODEL, or --layers N for a layer-dropped copy")
    where = device_of(device)
    cfg = Distill.from_options(locals(), "distill", lambda f: f"--{f.replace('_', '-')}")
    result = compress(
        student or teacher, [cfg], None, output / "model",
        overwrite=overwrite, teacher=teacher, train_dir=output, resume=resume, device=where,
    )  # fmt: skip
    if "distill" not in result.meta:  # not rank 0
        return
    d, t = result.meta["distill"], result.report["teacher_eval"]
    b, a = d["before"], d["after"]
    out.print(
        f"perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f} (teacher {t['perplexity']:.3f},"
        f" recovery {d['recovery']:.1%}); KLD {b['kld']:.4f} -> {a['kld']:.4f}; "
        f"{result.report.get('tokens_per_second') or 0:.0f} tok/s; wrote {output / 'model'}"
    )
