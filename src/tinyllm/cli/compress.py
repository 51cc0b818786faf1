"""`tinyllm quantize`, `prune` and `distill`: make a compressed checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinyllm.cli._common import (
    CalibDtypeOpt,
    ModelArg,
    _check_calib_dtype,
    _first_error,
    _make_step,
    out,
)
from tinyllm.cli.app import app
from tinyllm.errors import ConfigError


@app.command()
def quantize(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory.")],
    method: Annotated[
        str,
        typer.Option(
            help="Weight-only: rtn | gptq | awq | nf4 | embeddings (only embeddings and head); "
            "per-layer bits: mixed; weights and activations: int8-dynamic | int8-static | "
            "smoothquant | fp8."
        ),
    ] = "gptq",
    base: Annotated[
        str, typer.Option(help="AWQ: quantizer applied after scaling, rtn | gptq.")
    ] = "rtn",
    bits: Annotated[int, typer.Option(help="2, 3, 4, 5 or 8 (nf4: always 4).")] = 4,
    group_size: Annotated[
        int,
        typer.Option(
            help="Input columns sharing a scale: 32, 64, 128, or -1 for one per output channel."
        ),
    ] = 64,
    sym: Annotated[
        bool, typer.Option("--sym/--asym", help="Symmetric grid (no zero point).")
    ] = False,
    mse: Annotated[
        bool,
        typer.Option(
            help="Search each group's clipping range (MSE). AWQ with --clip sets its base's "
            "range by its own output-error search instead (see --base-search)."
        ),
    ] = True,
    act_order: Annotated[
        bool, typer.Option(help="GPTQ: columns by decreasing Hessian diagonal.")
    ] = True,
    static_groups: Annotated[
        bool, typer.Option(help="GPTQ: group grids fixed before updates.")
    ] = True,
    damp: Annotated[float, typer.Option(help="GPTQ: dampening, fraction of mean diag(H).")] = 0.01,
    float_targets: Annotated[
        float,
        typer.Option(
            help="GPTQ (also as AWQ's base): strength (0-1, 0 = off; GPTAQ uses 0.25) of moving "
            "each layer toward the float model's outputs rather than the float weights' outputs "
            "on the quantized model's inputs; one more block pass per block."
        ),
    ] = 0.0,
    true_sequential: Annotated[
        bool | None,
        typer.Option(
            "--true-sequential/--no-true-sequential",
            help="GPTQ (also as AWQ's base): quantize each block's layers in stages (q/k/v, o, "
            "gate/up, down), each stage calibrated on inputs through the quantized earlier "
            "stages. Default: on for GPTQ without --float-targets (the stages then take about "
            "one block forward, less than unstaged calibration's two), off with float targets "
            "or under AWQ (there they cost about a third more forward work).",
            show_default=False,
        ),
    ] = None,
    weighted_grid: Annotated[
        bool,
        typer.Option(
            help="GPTQ (also as AWQ's base): weigh each column's error in the group clipping "
            "search by its inputs' mean square (diag H), as an importance matrix does "
            "(smollm2-135m 4-bit g64: 1.17x -> 1.12x FP32 perplexity). With AWQ, whose own "
            "clipping search runs first, it helped at 4 bits and hurt at 3.",
        ),
    ] = True,
    refit_scales: Annotated[
        int,
        typer.Option(
            min=0,
            max=8,
            help="GPTQ (also as AWQ's base): rounds of least-squares refitting of each row's "
            "group scales on the layer's output error, codes fixed; each round after the first "
            "reruns the column loop on the refitted grids first. 0 = off.",
        ),
    ] = 0,
    clip: Annotated[
        bool, typer.Option(help="AWQ: search each group's clipping range on calibration inputs.")
    ] = True,
    base_search: Annotated[
        bool,
        typer.Option(
            help="AWQ with --clip: let the base (RTN or GPTQ) run its own weight-space clipping "
            "search (--mse) after AWQ's; off: AWQ's clamped range is the grid, as in the paper."
        ),
    ] = False,
    gguf_compatible: Annotated[
        str | None,
        typer.Option(
            help="q4_0 | q4_1 | q5_0 | q5_1 | q8_0: set --bits, --group-size 32 and --sym/--asym "
            "to that GGUF block grid (and GPTQ static groups), so `tinyllm export --type` "
            "carries the integers exactly."
        ),
    ] = None,
    embed_bits: Annotated[
        int | None,
        typer.Option(
            help="Also quantize the token embeddings and output head (RTN, symmetric, MSE "
            "clipping, one scale per row at 8 bits and per 32 values below; a tied head shares "
            "the table) to this many bits: 8 or 4 for GGUF q8_0/q4_0. Default: they stay float."
        ),
    ] = None,
    activations: Annotated[
        str,
        typer.Option(
            help="smoothquant, fp8: static (ranges fixed from calibration) or dynamic (per-token "
            "scales at run time). Default: static for smoothquant, dynamic for fp8."
        ),
    ] = "",
    observer: Annotated[
        str,
        typer.Option(
            help="Static activations: minmax (extremes seen), percentile (--percentile of each "
            "tail) or mse (range that minimises the rounding error)."
        ),
    ] = "minmax",
    granularity: Annotated[
        str,
        typer.Option(
            help="Static int8 activations: one scale per tensor, or per input channel (folded "
            "into the weight's columns, so the GEMM stays integer)."
        ),
    ] = "tensor",
    percentile: Annotated[float, typer.Option(help="Percentile observer's p, in (50, 100].")] = (
        99.99
    ),
    act_sym: Annotated[
        bool,
        typer.Option("--act-sym/--act-asym", help="Static activations: symmetric or zero point."),
    ] = True,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="SmoothQuant migration strength in [0, 1]; omitted: searched (--alpha-search)."
        ),
    ] = None,
    alpha_search: Annotated[
        str, typer.Option(help="SmoothQuant: search alpha per layer (group) or per model.")
    ] = "layer",
    fp8_format: Annotated[str, typer.Option(help="FP8: e4m3 or e5m2.")] = "e4m3",
    avg_bits: Annotated[
        float | None,
        typer.Option(help="mixed: budget as mean bits per linear weight (codes), e.g. 3.5."),
    ] = None,
    size_mb: Annotated[
        float | None,
        typer.Option(help="mixed: budget as MiB of the block linears (codes, scales, zeros)."),
    ] = None,
    candidate_bits: Annotated[
        str, typer.Option(help="mixed: widths a layer may get, comma-separated.")
    ] = "3,4,8",
    calib_corpus: Annotated[str, typer.Option(help="Corpus for calibration windows.")] = "enwiki",
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample.")] = 0,
    calib_dtype: CalibDtypeOpt = "float32",
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace a non-empty output directory, only one tinyllm wrote."),
    ] = False,
    float_dtype: Annotated[
        str,
        typer.Option(
            help="Precision of the tensors left in float (embeddings, norms, head): float16 or "
            "float32. float16 rounds them in the model too, so the checkpoint reloads exactly."
        ),
    ] = "float16",
) -> None:
    """Quantize the linear layers of the decoder blocks and write a packed checkpoint.

    Calibrated methods (gptq, awq) run block by block on SAMPLES windows of SEQ_LEN tokens drawn
    with SEED from outside the corpus's evaluation slice. The output directory holds the packed
    safetensors weights, the tokenizer, tinyllm.json (method and every setting) and
    layer_errors.json; `tinyllm eval DIR` and `tinyllm.load(DIR)` read it back.

    Examples:

      tinyllm quantize smollm2-135m --method gptq --bits 4 --group-size 64 -o out/gptq-4b

      tinyllm quantize smollm2-135m --method awq --base gptq --group-size 32 --sym -o out/q4

      tinyllm quantize smollm2-135m --method rtn --bits 8 --group-size -1 --sym -o out/int8

      tinyllm quantize smollm2-135m --gguf-compatible q4_0 --embed-bits 8 -o out/q4-e8

      tinyllm quantize smollm2-135m --method smoothquant -o out/w8a8   (alpha searched)

      tinyllm quantize smollm2-135m --method int8-dynamic -o out/w8a8-dyn

      tinyllm quantize smollm2-135m --method mixed --avg-bits 3.5 --base gptq -o out/mixed

    Methods that quantize activations write an activation report (per-layer input outlier
    ratios) beside the checkpoint; `tinyllm outliers MODEL` prints it for any model.
    """
    import torch

    from tinyllm.checkpoint import check_output_dir, round_floats, save_checkpoint
    from tinyllm.core.load import load
    from tinyllm.data.calibration import calibration_windows
    from tinyllm.quant.api import quantize as run_quantize
    from tinyllm.quant.api import step_classes

    classes = step_classes()
    if method not in classes:
        raise ConfigError(f"unknown method '{method}'; choose one of {', '.join(classes)}")
    if gguf_compatible is not None:
        from tinyllm.export.gguf_blocks import compatible_grid

        if method == "nf4":
            raise ConfigError("--gguf-compatible: NF4 codebooks have no GGUF block type")
        try:
            bits, group_size, sym = compatible_grid(gguf_compatible)
        except ValueError as exc:
            raise ConfigError(f"--gguf-compatible: {exc}") from exc
        static_groups = True
    options = dict(
        bits=bits,
        group_size=group_size,
        sym=sym,
        mse=mse,
        act_order=act_order,
        static_groups=static_groups,
        damp=damp,
        float_targets=float_targets,
        true_sequential=true_sequential,
        weighted_grid=weighted_grid,
        refit_scales=refit_scales,
    )
    options.update(
        observer=observer,
        granularity=granularity,
        percentile=percentile,
        act_sym=act_sym,
        alpha=alpha,
        search=alpha_search,
        format=fp8_format,
    )
    if activations:
        options["activations"] = activations
    if method == "awq":
        if base not in ("rtn", "gptq"):
            raise ConfigError(f"--base must be rtn or gptq, got '{base}'")
        base_cfg = _make_step(classes[base], base, **options)
        cfg = classes["awq"](base=base_cfg, clip=clip, base_search=base_search)
    elif method == "mixed":
        awq_opts = {"clip": clip, "base_search": base_search}
        cfg = _mixed_step(classes, base, options, awq_opts, avg_bits, size_mb, candidate_bits)
    else:
        cfg = _make_step(classes[method], method, **options)
    if float_dtype not in ("float16", "float32"):
        raise ConfigError(f"--float-dtype must be float16 or float32, got '{float_dtype}'")
    embed_cfg = None
    if embed_bits is not None:
        from tinyllm.quant.embed import embed_step

        try:
            embed_cfg = embed_step(embed_bits)
        except ValueError as exc:
            raise ConfigError(f"--embed-bits: {_first_error(exc)}") from exc
    _check_calib_dtype(calib_dtype)
    check_output_dir(output, overwrite)  # fail before the slow part
    m, tok = load(model)
    calib = None
    if cfg.calibrated:
        calib = calibration_windows(tok, calib_corpus, samples, seq_len, seed)
    report = run_quantize(m, cfg, calib=calib, calib_dtype=calib_dtype)
    steps = [cfg.describe()]
    if embed_cfg is not None:
        emb = run_quantize(m, embed_cfg)
        report["layer_errors"] = {**report.get("layer_errors", {}), **emb["layer_errors"]}
        report["seconds"] += emb["seconds"]
        steps.append(embed_cfg.describe())
    round_floats(m, getattr(torch, float_dtype))
    from tinyllm.eval.memory import peak_rss_bytes

    meta = {
        "float_dtype": float_dtype,
        "peak_rss_bytes": peak_rss_bytes(),
        "source": model,
        "gguf_compatible": gguf_compatible,
        "steps": steps,
        "seconds": report["seconds"],
        "calibration": {
            "corpus": calib_corpus,
            "samples": samples,
            "seq_len": seq_len,
            "seed": seed,
            "dtype": report.get("calib_dtype"),
        }
        if cfg.calibrated
        else None,
    }
    save_checkpoint(
        m,
        tok,
        output,
        meta,
        overwrite=overwrite,
        extra_files={
            "layer_errors.json": report.get("layer_errors", {}),
            "quant_report.json": {k: v for k, v in report.items() if k != "layer_errors"},
        },
    )
    errs = list(report.get("layer_errors", {}).values())
    out.print(
        f"quantized {len(errs)} layers with {method} in {report['seconds']:.1f} s "
        f"(mean layer error {sum(errs) / max(len(errs), 1):.4g}); wrote {output}"
    )
    for key in ("activations", "simulated", "avg_bits", "smoothquant_model_alpha"):
        if key in report:
            out.print(f"  {key.replace('_', ' ')}: {report[key]}")
    if report.get("outliers"):
        worst = max(report["outliers"].items(), key=lambda kv: kv[1]["ratio"])
        out.print(
            f"  largest input outlier ratio (max / median channel): {worst[1]['ratio']:.0f} at "
            f"{worst[0]}; see quant_report.json or `tinyllm outliers`"
        )


@app.command()
def prune(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory.")],
    method: Annotated[
        str,
        typer.Option(
            help="magnitude | wanda | sparsegpt | channels | heads | blocks | movement | imp."
        ),
    ] = "wanda",
    sparsity: Annotated[
        float,
        typer.Option(
            help="Fraction removed, in [0, 1): of the weights (magnitude, wanda, sparsegpt), of "
            "each block's FFN channels (channels) or KV groups (heads)."
        ),
    ] = 0.5,
    pattern: Annotated[
        str | None, typer.Option(help="N:M semi-structured sparsity, e.g. 2:4 (overrides it).")
    ] = None,
    allocation: Annotated[
        str, typer.Option(help="uniform | owl (outlier-weighted sparsity per block).")
    ] = "uniform",
    scope: Annotated[str, typer.Option(help="magnitude: layer | row | global.")] = "layer",
    count: Annotated[
        int | None, typer.Option(help="heads: KV groups per block; blocks: blocks to remove.")
    ] = None,
    importance: Annotated[
        str,
        typer.Option(
            help="channels / heads: activation (||a|| * ||W|| on calibration inputs, block by "
            "block) | gradient (first-order Taylor |W * dL/dW| of the LM loss, one backward pass "
            "over the calibration windows; try --samples 32)."
        ),
    ] = "activation",
    bits: Annotated[
        int | None, typer.Option(help="sparsegpt: also quantize to this many bits in one pass.")
    ] = None,
    group_size: Annotated[int, typer.Option(help="sparsegpt --bits: 32, 64 or 128.")] = 128,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="sparsegpt --bits: grid.")] = False,
    calib_corpus: Annotated[str, typer.Option(help="Corpus for calibration windows.")] = "enwiki",
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample.")] = 0,
    calib_dtype: CalibDtypeOpt = "float32",
    steps: Annotated[
        int, typer.Option(help="movement: training steps; imp: steps per round.")
    ] = 200,
    lr: Annotated[float, typer.Option(help="movement / imp: learning rate.")] = 1e-4,
    rounds: Annotated[int, typer.Option(help="imp: prune-retrain rounds.")] = 3,
    rewind: Annotated[
        bool, typer.Option(help="imp: reset surviving weights to the original before retraining.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace a non-empty output directory, only one tinyllm wrote."),
    ] = False,
) -> None:
    """Prune the decoder blocks and write a checkpoint (sparse layers stored as mask + values).

    Unstructured and N:M methods zero weights: magnitude (smallest |W|), wanda (|W| * ||X||,
    per output row), sparsegpt (OBS updates through the inverse Hessian; --bits fuses GPTQ-style
    quantization). --allocation owl gives blocks with more activation outliers less sparsity at
    the same overall ratio. Structured methods shrink tensors and rewrite the config: channels
    (FFN), heads (whole KV groups), blocks (lowest block influence). Prune before quantizing.

    Training methods use the distillation trainer with the dense model as teacher and write a
    training directory (the pruned model in OUTPUT/model): movement (scores -W*grad accumulated
    while fine-tuning, sparsity raised on a cubic schedule), imp (ROUNDS rounds of magnitude
    pruning and retraining, --rewind for lottery-ticket rewinding).

    Examples:

      tinyllm prune smollm2-135m --method wanda --sparsity 0.5 -o out/wanda50

      tinyllm prune smollm2-135m --method sparsegpt --pattern 2:4 -o out/sgpt24

      tinyllm prune smollm2-135m --method channels --sparsity 0.25 -o out/ffn25

      tinyllm prune smollm2-135m --method heads --count 1 --importance gradient -o out/kv

      tinyllm prune smollm2-135m --method blocks --count 4 -o out/drop4

      tinyllm prune smollm2-135m --method movement --sparsity 0.5 --steps 300 -o out/move50
    """
    if method in ("movement", "imp"):
        _train_prune(model, output, method, sparsity, steps, lr, rounds, rewind, overwrite)
        return
    import torch

    from tinyllm.checkpoint import check_output_dir, round_floats, save_checkpoint
    from tinyllm.core.load import load
    from tinyllm.data.calibration import calibration_windows
    from tinyllm.eval.memory import peak_rss_bytes
    from tinyllm.models.sparsity import sparsity_of
    from tinyllm.prune.api import prune as run_prune
    from tinyllm.prune.api import step_classes
    from tinyllm.prune.common import check_float_model

    classes = step_classes()
    if method not in classes:
        raise ConfigError(f"unknown method '{method}'; choose one of {', '.join(classes)}")
    options = dict(sparsity=sparsity, pattern=pattern, allocation=allocation, scope=scope)
    options.update(bits=bits, group_size=group_size, sym=sym, ratio=sparsity, count=count)
    options["importance"] = importance
    if method == "heads" and count is not None:
        options["ratio"] = None
    if method == "blocks" and count is None:
        raise ConfigError("--method blocks needs --count N (blocks to remove)")
    cfg = _make_step(classes[method], method, **options)
    _check_calib_dtype(calib_dtype)
    check_output_dir(output, overwrite)
    m, tok = load(model)
    check_float_model(m)
    calib = None
    if cfg.calibrated or allocation == "owl":
        calib = calibration_windows(tok, calib_corpus, samples, seq_len, seed)
    report = run_prune(m, cfg, calib=calib, calib_dtype=calib_dtype)
    round_floats(m, torch.float16)
    meta = {
        "source": model,
        "steps": [cfg.describe()],
        "seconds": report["seconds"],
        "peak_rss_bytes": peak_rss_bytes(),
        "sparsity": sparsity_of(m),
        "calibration": None
        if calib is None
        else {
            "corpus": calib_corpus,
            "samples": samples,
            "seq_len": seq_len,
            "seed": seed,
            "dtype": report.get("calib_dtype"),
        },
    }
    extra = {"prune_report.json": {k: v for k, v in report.items() if k != "seconds"}}
    save_checkpoint(m, tok, output, meta, overwrite=overwrite, extra_files=extra)
    from tinyllm.models.size import param_count

    out.print(
        f"pruned with {method} in {report['seconds']:.1f} s: sparsity {meta['sparsity']:.1%} of "
        f"the block linears, {param_count(m):,} parameters; wrote {output}"
    )


@app.command()
def distill(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory.")],
    teacher: Annotated[str, typer.Option(help="Teacher model (any MODEL spec).")] = "smollm2-135m",
    student: Annotated[
        str | None,
        typer.Option(
            help="Student model: any MODEL spec with the teacher's tokenizer, e.g. a quantized "
            "checkpoint (trained through fake quantization, saved packed again) or a pruned one "
            "(masks kept). Default with --layers: the teacher."
        ),
    ] = None,
    layers: Annotated[
        int | None,
        typer.Option(help="Keep this many evenly spaced blocks of the student (15 of 30: 0,2,..)."),
    ] = None,
    alpha: Annotated[float, typer.Option(help="Weight of the soft-target KD loss.")] = 1.0,
    beta: Annotated[float, typer.Option(help="Weight of next-token cross-entropy.")] = 0.0,
    gamma: Annotated[float, typer.Option(help="Weight of hidden-state matching.")] = 0.0,
    delta: Annotated[
        float, typer.Option(help="Weight of attention-map KL (eager attention).")
    ] = 0.0,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the KD loss.")] = 1.0,
    kd: Annotated[str, typer.Option(help="KD divergence: forward | reverse | js.")] = "forward",
    feature: Annotated[str, typer.Option(help="Hidden-state distance: mse | cosine.")] = "mse",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 500,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-4,
    scale_lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate of quantization scales (log-scales), norms and biases "
            "(QAT: 3e-3 works where the weights take 1e-4); default --lr."
        ),
    ] = None,
    warmup: Annotated[float, typer.Option(help="Warmup, fraction of steps (then cosine).")] = 0.05,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    batch: Annotated[int, typer.Option(help="Windows per micro-batch (per process).")] = 4,
    seq_len: Annotated[int, typer.Option(help="Tokens per training window.")] = 256,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    clip: Annotated[float, typer.Option(help="Gradient-norm clipping.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the data order.")] = 0,
    corpus: Annotated[str, typer.Option(help="Corpus (training split; never its eval slice).")] = (
        "enwiki"
    ),
    teacher_cache: Annotated[
        bool,
        typer.Option(
            help="Cache the teacher's top-k logits and the mass outside them on disk; KD then "
            "runs over the k tokens plus 'any other' (forward KD only)."
        ),
    ] = False,
    topk: Annotated[int, typer.Option(help="Logits kept per position by --teacher-cache.")] = 64,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N steps (0: never).")] = 100,
    eval_windows: Annotated[int, typer.Option(help="Windows of the periodic evaluations.")] = 8,
    eval_seq_len: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 512,
    final_eval_windows: Annotated[
        int, typer.Option(help="Windows of the before/after evaluations.")
    ] = 40,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 100,
    resume: Annotated[bool, typer.Option(help="Continue the run in OUTPUT.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty OUTPUT.")] = False,
    train: Annotated[
        str,
        typer.Option(
            help="What trains: all, or scales (QAT of a quantized student: only its quantization "
            "scales, norms and biases; latent weights and embeddings frozen)."
        ),
    ] = "all",
) -> None:
    """Train a student to behave like its teacher: L = alpha*KD + beta*task + gamma*feature.

    Trains on the corpus outside its evaluation slice; evaluates perplexity and KL to the teacher
    before, every EVAL_EVERY steps and after. OUTPUT gets model/ (the student: `tinyllm eval
    OUTPUT/model`), checkpoint/ (for --resume; Ctrl-C saves one), log.csv, log.json, loss.png and
    summary.json (perplexities, recovery, tokens/s, peak RSS). Runs under
    `torchrun --nproc_per_node=N` with DistributedDataParallel (batch is per process).

    Examples:

      tinyllm distill --layers 15 --steps 400 -o out/student15

      tinyllm distill --student out/gptq-3b --steps 60 --lr 1e-4 -o out/qat-3b

      tinyllm distill --student out/gptq-3b --train scales --lr 3e-3 --steps 60 -o out/qat-3b-scales

      torchrun --nproc_per_node=2 -m tinyllm.cli distill --layers 15 -o out/ddp
    """
    from pydantic import ValidationError

    from tinyllm.distill.trainer import DistillConfig, distill, make_run

    options = {k: v for k, v in locals().items() if k in DistillConfig.model_fields}
    try:
        cfg = DistillConfig(**options)
    except ValidationError as exc:
        raise ConfigError(f"distill: {_first_error(exc)}") from exc
    run, meta = make_run(teacher, student, layers, cfg, output, resume, overwrite)
    summary = distill(run, cfg, resume=resume, save_meta=meta)
    if "after" not in summary:  # not rank 0
        return
    b, a, t = summary["before"], summary["after"], summary["teacher_eval"]
    out.print(
        f"perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f} (teacher {t['perplexity']:.3f},"
        f" recovery {summary['recovery']:.1%}); KLD {b['kld']:.4f} -> {a['kld']:.4f}; "
        f"{summary['tokens_per_second'] or 0:.0f} tok/s; wrote {output / 'model'}"
    )


def _train_prune(
    model: str,
    output: Path,
    method: str,
    sparsity: float,
    steps: int,
    lr: float,
    rounds: int,
    rewind: bool,
    overwrite: bool,
) -> None:
    """movement / imp: pruning inside the distillation trainer (teacher: the dense model)."""
    from tinyllm.distill.trainer import DistillConfig, distill, make_run
    from tinyllm.prune.movement import MovementPruner, iterative_magnitude

    if not 0 < sparsity < 1:
        raise ConfigError(f"--sparsity must be in (0, 1), got {sparsity}")
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}")
    cfg = _make_step(DistillConfig, method, steps=steps, lr=lr, beta=1.0)
    if method == "imp":
        summary = iterative_magnitude(model, cfg, output, sparsity, rounds, rewind)
        where = output / f"round-{rounds}" / "model"
    else:
        run, meta = make_run(model, model, None, cfg, output, overwrite=overwrite)
        run.hooks.append(MovementPruner(run.student, sparsity, cfg.steps))
        meta["steps"].insert(-1, {"type": "movement", "sparsity": sparsity})
        summary = distill(run, cfg, save_meta=meta)
        where = output / "model"
    out.print(
        f"{method}: perplexity {summary['before']['perplexity']:.3f} -> "
        f"{summary['after']['perplexity']:.3f} (dense {summary['teacher_eval']['perplexity']:.3f});"
        f" wrote {where}"
    )


def _mixed_step(
    classes: dict,
    base: str,
    options: dict,
    awq_opts: dict,
    avg_bits: float | None,
    size_mb: float | None,
    candidate_bits: str,
) -> object:
    """The `mixed` step: per-layer widths from `candidate_bits` under one budget, any base."""
    if base not in ("rtn", "gptq", "awq"):
        raise ConfigError(f"--base must be rtn, gptq or awq for mixed, got '{base}'")
    try:
        widths = [int(b) for b in candidate_bits.split(",") if b.strip()]
    except ValueError as exc:
        msg = f"--candidate-bits: comma-separated integers, got '{candidate_bits}'"
        raise ConfigError(msg) from exc
    if base == "awq":
        base_cfg = classes["awq"](base=_make_step(classes["rtn"], "rtn", **options), **awq_opts)
    else:
        base_cfg = _make_step(classes[base], base, **options)
    return _make_step(
        classes["mixed"], "mixed", base=base_cfg, bits=widths, avg_bits=avg_bits, size_mb=size_mb
    )
