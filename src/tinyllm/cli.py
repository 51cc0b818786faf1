"""The `tinyllm` command. Parsing and printing only; the work happens in the library."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from tinyllm.errors import ConfigError, TinyLLMError

app = typer.Typer(
    help="Compress a pretrained LLM, measure what each step cost, export it and serve it.\n\n"
    "MODEL is a registered name (smollm2-135m, gemma3-270m), a Hugging Face model directory, "
    "a .gguf file, or a tinyllm output directory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

ModelArg = Annotated[
    str, typer.Argument(help="Registered name, HF directory, .gguf file or tinyllm dir.")
]


@app.callback()
def _global_options(
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Load tinyllm checkpoints without checking their weight files against the "
            "sha256 digests in tinyllm.json (accepted anywhere on the command line).",
        ),
    ] = False,
) -> None:
    if no_verify:
        from tinyllm.models.load import set_verify_default

        set_verify_default(False)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, value)
    return table


@app.command()
def info(
    model: ModelArg = "smollm2-135m",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the facts to this JSON file.")
    ] = None,
) -> None:
    """Architecture, parameter counts, shapes, dtype and size of a model."""
    from tinyllm.models.info import model_info
    from tinyllm.models.load import load

    m, _ = load(model)
    i = model_info(m)
    rows = [
        ("architecture", f"{i.architecture} ({i.model_type})"),
        ("parameters", f"{i.params:,}"),
        ("in block linears", f"{i.linear_params:,} ({100 * i.linear_params / i.params:.1f}%)"),
        ("layers", str(i.layers)),
        ("hidden size", str(i.hidden_size)),
        ("heads / KV heads", f"{i.heads} / {i.kv_heads}"),
        ("vocabulary", f"{i.vocab_size:,}"),
        ("dtype", i.dtype),
        ("size in memory", human_bytes(i.size_in_memory_bytes)),
        ("size on disk", human_bytes(i.size_on_disk_bytes)),
        ("linear roles", ", ".join(f"{k} x{v}" for k, v in i.roles.items())),
    ]
    out.print(_table(f"tinyllm info {model}", rows))
    if json_out:
        from tinyllm.util.fs import write_json_atomic

        write_json_atomic(json_out, i.to_dict())


@app.command("eval")
def eval_(
    model: ModelArg = "smollm2-135m",
    corpus: Annotated[
        str, typer.Option(help="'enwiki', a UTF-8 .txt, a .jsonl or a directory.")
    ] = "enwiki",
    seq_len: Annotated[int, typer.Option(help="Tokens per window (at least 2).")] = 512,
    windows: Annotated[int, typer.Option(help="Windows from the corpus's evaluation slice.")] = 40,
    reference: Annotated[
        str | None,
        typer.Option(
            help="Also report KL(reference || model) and top-1 agreement against this model."
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Windows per forward (default: 2048 tokens).")
    ] = None,
    fast: Annotated[
        bool, typer.Option(help="Run fp32 linears through oneDNN while scoring.")
    ] = True,
) -> None:
    """Perplexity (and KLD/agreement with --reference), size, bits per weight, speed, memory.

    Protocol: the corpus is tokenized without special tokens; WINDOWS back-to-back windows of
    SEQ_LEN tokens are cut from its evaluation slice (its first 65,536 tokens); BOS is prepended
    only when the tokenizer adds one by default; every position after the first is scored.
    """
    import tinyllm
    from tinyllm.data.windows import check_seq_len

    check_seq_len(seq_len)  # fail before loading anything
    m, tok = tinyllm.load(model)
    ref = tinyllm.load(reference) if reference else None
    result = tinyllm.evaluate(
        m,
        tok,
        corpus=corpus,
        seq_len=seq_len,
        windows=windows,
        reference=ref,
        batch_size=batch_size,
        name=model,
        fast=fast,
    )
    out.print(_table(f"tinyllm eval {model}", _eval_rows(result)))
    if json_out:
        result.save_json(json_out)
        out.print(f"wrote {json_out}")


CalibDtypeOpt = Annotated[
    str,
    typer.Option(
        "--calib-dtype",
        help="Precision of the calibration passes: float32, bfloat16 (linears under autocast, "
        "Hessians from bf16 products with the 32 largest input channels exact; GPTQ 4-bit g64 "
        "about 0.7x the fp32 time, same quality within run-to-run spread) or auto (bfloat16 "
        "where the CPU has native bf16 dot products).",
    ),
]


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

    import tinyllm
    from tinyllm.checkpoint import check_output_dir, round_floats, save_checkpoint
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
    m, tok = tinyllm.load(model)
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
def outliers(
    model: ModelArg,
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    calib_corpus: Annotated[str, typer.Option(help="Corpus for calibration windows.")] = "enwiki",
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample.")] = 0,
    top: Annotated[int, typer.Option(help="Rows to print, worst first (0: all).")] = 20,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the full report here.")
    ] = None,
) -> None:
    """Show each linear layer's input outliers: why a model resists W8A8.

    For every block linear: the largest per-channel |input| over calibration windows, the ratio
    of the largest channel to the median channel, and `levels`, how many of an 8-bit per-tensor
    grid's 127 steps the median channel gets. Ratios in the hundreds (few levels) are what
    SmoothQuant (`tinyllm quantize --method smoothquant`) flattens.

    Example: tinyllm outliers smollm2-135m --samples 16 --top 10
    """
    import tinyllm
    from tinyllm.data.calibration import calibration_windows
    from tinyllm.quant.outliers import outlier_report

    m, tok = tinyllm.load(model)
    calib = calibration_windows(tok, calib_corpus, samples, seq_len, seed)
    report = outlier_report(m, calib)
    rows = sorted(report.items(), key=lambda kv: -kv[1]["ratio"])
    table = Table("layer", "max |x|", "median channel max", "ratio", "int8 levels (median)")
    for name, r in rows[: top or None]:
        table.add_row(
            name,
            f"{r['max']:.3g}",
            f"{r['median_channel_max']:.3g}",
            f"{r['ratio']:.0f}",
            f"{r['levels']:.1f}",
        )
    out.print(table)
    if json_out is not None:
        from tinyllm.util.fs import write_json_atomic

        write_json_atomic(json_out, report)
        out.print(f"wrote {json_out}")


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

    import tinyllm
    from tinyllm.checkpoint import check_output_dir, round_floats, save_checkpoint
    from tinyllm.data.calibration import calibration_windows
    from tinyllm.eval.memory import peak_rss_bytes
    from tinyllm.prune.api import prune as run_prune
    from tinyllm.prune.api import step_classes
    from tinyllm.prune.common import check_float_model, sparsity_of

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
    m, tok = tinyllm.load(model)
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
    from tinyllm.eval.size import param_count

    out.print(
        f"pruned with {method} in {report['seconds']:.1f} s: sparsity {meta['sparsity']:.1%} of "
        f"the block linears, {param_count(m):,} parameters; wrote {output}"
    )


@app.command()
def export(
    model: ModelArg,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output file (gguf, onnx) or directory (hf).")
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="gguf (llama.cpp), onnx (onnxruntime, with KV-cache inputs/outputs) or hf (a "
            "Hugging Face directory; quantized layers in the compressed-tensors pack-quantized "
            "format).",
        ),
    ] = "gguf",
    type: Annotated[
        str | None,
        typer.Option(
            "--type",
            help="GGUF: type of the block linears, f32, f16 (default), bf16, q8_0, q4_0, q4_1, "
            "q5_0, q5_1. ONNX: fp32 (default), q4 or q8 (quantized layers as MatMulNBits), "
            "w8a8 (int8-static/-dynamic and smoothquant layers as QuantizeLinear + "
            "MatMulInteger). "
            "Quantized layers on a matching grid are carried bit for bit.",
        ),
    ] = None,
    embed_type: Annotated[
        str | None,
        typer.Option(help="Type of the embedding/head (default: the --type if float, else q8_0)."),
    ] = None,
    strict: Annotated[
        bool, typer.Option(help="Refuse instead of re-quantizing a layer that cannot be carried.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace an existing output (an hf directory only if tinyllm wrote it)."),
    ] = False,
) -> None:
    """Export a model (original or compressed) for another runtime.

    --format hf writes a directory transformers' AutoModelForCausalLM.from_pretrained loads:
    float models as plain safetensors, quantized ones in the compressed-tensors pack-quantized
    format (needs `pip install compressed-tensors` to write and to load).

    GGUF files load in llama.cpp (llama-cli, llama-server, llama-cpp-python). A tinyllm checkpoint
    quantized on a grid a GGUF block type holds (4-bit symmetric, groups of 32 or a multiple ->
    q4_0; 4-bit -> q4_1; 5-bit -> q5_0/q5_1; 8-bit symmetric -> q8_0) keeps its exact integers
    and scales; other layers are re-quantized with a warning (or refused with --strict).
    `tinyllm quantize ... --gguf-compatible q4_0` makes GPTQ/AWQ produce such a grid.

    --format onnx writes a decoder graph with KV-cache inputs and outputs (Llama, Mistral, Qwen2)
    for onnxruntime, weights in FILE.data beside it; --type q4/q8 carries 4/8-bit layers as
    MatMulNBits with their integers.

    Examples:

      tinyllm export smollm2-135m --type f16 -o smollm2-f16.gguf

      tinyllm quantize smollm2-135m --method gptq --gguf-compatible q4_0 -o out/gptq-q4_0
      tinyllm export out/gptq-q4_0 --type q4_0 --strict -o smollm2-gptq-q4_0.gguf

      tinyllm export out/gptq-q4_0 --format hf -o out/gptq-q4_0-hf

      tinyllm export out/gptq-q4_0 --format onnx --type q4 -o smollm2-q4.onnx
    """
    import tinyllm
    from tinyllm.export import DEFAULT_TYPES, check_output
    from tinyllm.export import export as run_export
    from tinyllm.util.fs import dir_size

    check_output(output, format, overwrite)  # fail before loading
    type = type or DEFAULT_TYPES.get(format)
    m, tok = tinyllm.load(model)
    report = run_export(
        m, tok, output, format, type, overwrite=overwrite, strict=strict, embed_type=embed_type
    )
    if format == "hf":
        out.print(
            f"wrote {output} ({human_bytes(dir_size(output))}): {len(report['packed'])} layers "
            f"packed, {len(report['dequantized'])} written as float"
        )
        return
    if format == "onnx":
        size = output.stat().st_size + output.with_name(output.name + ".data").stat().st_size
        out.print(
            f"wrote {output} (+ .data, {human_bytes(size)}): {len(report.nbits)} layers as "
            f"MatMulNBits, {len(report.float_layers)} quantized layers as float"
        )
        return
    out.print(
        f"wrote {output} ({human_bytes(output.stat().st_size)}): "
        f"{len(report.carried)} layers carried, {len(report.requantized)} re-quantized"
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


@app.command("run")
def run_(
    recipe: Annotated[
        str, typer.Argument(help="Recipe YAML file, or a built-in name (`tinyllm recipes`).")
    ],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Run directory (default: runs/RECIPE-NAME)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in OUTPUT after its last finished stage.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Start over in OUTPUT, a previous run's directory (any other non-empty "
            "directory is refused); the old run is deleted once the new one is in place."
        ),
    ] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Only validate the recipe and print its stages.")
    ] = False,
) -> None:
    """Run a recipe: stages in order (distill -> prune -> quantize is the recommended order), each
    checkpointed and scored, then the exports and the report.

    After every stage the model is saved atomically to OUTPUT/stages/NN-TYPE and scored against
    the original (perplexity, KLD, top-1 agreement, size on disk, bits per weight, time, peak
    RSS). A run killed at any point continues with --resume after its last finished stage (a
    training stage continues from its own last checkpoint); --resume refuses a recipe that changed
    and shows the difference. OUTPUT gets report.md and report.html (`tinyllm report` rebuilds
    them). A run locks OUTPUT (.OUTPUT.lock beside it): a second run into it fails at once.

    A recipe is YAML, never code:

      model: smollm2-135m
      calibration: {corpus: enwiki, samples: 128, seq_len: 512, seed: 0}
      evaluation: {corpus: enwiki, windows: 40, seq_len: 512}
      stages:
        - {type: wanda, sparsity: 0.3}
        - {type: recover, steps: 60}
        - {type: gptq, bits: 4, group_size: 32, sym: true}
      export: [{format: gguf, type: q4_0}]

    Stage types: magnitude, wanda, sparsegpt, channels, heads, blocks (pruning); rtn, gptq, awq,
    nf4 (quantization; awq takes base: {type: gptq, bits: 4, ...}); distill (layers: N for a
    layer-dropped student) and recover (KD + task loss on the current model). Fields are those
    of the Python step configs (docs/recipes.md).

    Examples:

      tinyllm recipes

      tinyllm run edge -o runs/edge

      tinyllm run my-recipe.yaml -o runs/mine --resume
    """
    from tinyllm.pipeline.recipe import load_recipe, resolve_recipe, stage_name
    from tinyllm.pipeline.runner import run_recipe

    path = resolve_recipe(recipe)
    rec = load_recipe(path)
    for w in rec.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    if check:
        out.print(f"{path}: valid; model {rec.model}")
        for i, s in enumerate(rec.stages, 1):
            out.print(f"  {i}. {stage_name(s)} {s.model_dump(exclude_unset=True)}")
        for e in rec.exports:
            out.print(f"  export {e.format} {e.type or ''}")
        return
    output = output or Path("runs") / path.stem

    def on_stage(r: dict) -> None:
        e = r["eval"]
        out.print(
            f"stage {r['index']} {r['type']}: perplexity {e['perplexity']:.3f}, KLD "
            f"{e['kld']:.4f}, {human_bytes(r['weights_bytes'])} on disk, {r['seconds']:.0f} s"
        )

    state = run_recipe(rec, path.read_text(encoding="utf-8"), output, resume, overwrite, on_stage)
    from tinyllm.pipeline.report import markdown_table

    out.print(markdown_table(state), highlight=False, soft_wrap=True)
    out.print(f"report: {output / 'report.md'} and {output / 'report.html'}")


@app.command()
def recipes() -> None:
    """List the built-in recipes (run one with `tinyllm run NAME`; copy its file to change it)."""
    from tinyllm.pipeline.recipe import builtin_recipes

    for name, (path, line) in builtin_recipes().items():
        out.print(f"[bold]{name:10}[/] {line}  ({path})", highlight=False, soft_wrap=True)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A `tinyllm run` output directory.")],
) -> None:
    """Rebuild report.md and report.html of a run directory from its state.json."""
    from tinyllm.pipeline.report import write_report
    from tinyllm.pipeline.rundir import read_state

    read_state(run_dir)  # a missing or corrupt state.json is a one-line error
    md, page = write_report(run_dir)
    out.print(f"wrote {md} and {page}")


@app.command()
def plan(
    model: ModelArg,
    max_size: Annotated[
        str,
        typer.Option(
            help="Size budget on disk: 90MB, 85MiB, 1.5GB, or 0.35x (a fraction of the float16 "
            "size)."
        ),
    ],
    max_ppl_ratio: Annotated[
        float | None, typer.Option(help="Largest perplexity ratio to the original.")
    ] = None,
    max_latency: Annotated[
        float | None, typer.Option(help="Largest decode latency, ms per token (checked for real).")
    ] = None,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Directory for plan.md/json, front.png, recipe.")
    ] = Path("plan"),
    verify_top: Annotated[
        int, typer.Option(help="Best predicted candidates quantized and scored for real.")
    ] = 3,
    probe_windows: Annotated[int, typer.Option(help="Calibration windows for sensitivity.")] = 2,
    probe_seq_len: Annotated[int, typer.Option(help="Tokens per sensitivity window.")] = 256,
    calib_corpus: Annotated[str, typer.Option(help="Corpus for calibration windows.")] = "enwiki",
    samples: Annotated[int, typer.Option(help="Calibration windows for GPTQ.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    eval_corpus: Annotated[str, typer.Option(help="Corpus of the verification scores.")] = (
        "enwiki"
    ),
    eval_windows: Annotated[int, typer.Option(help="Evaluation windows.")] = 40,
    eval_seq_len: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 512,
    mixed: Annotated[
        bool,
        typer.Option(help="Also search per-layer bit widths (2/3/4/5/8) filling the budget."),
    ] = True,
) -> None:
    """Search quantization recipes against a budget; print the Pareto front and the recommendation.

    Measures each block linear's sensitivity (KL to the original with only that layer quantized,
    on calibration windows), predicts size (exactly) and KL of every uniform grid (bits 2-8,
    groups 32/64/128/per-channel, symmetric or not), quantizes the best few that fit with GPTQ and
    scores them with the evaluation harness. Writes OUTPUT/plan.md, plan.json, front.png and
    OUTPUT/recommended.yaml, a recipe `tinyllm run` accepts. With --mixed (default) it also
    allocates per-layer widths (2, 3, 4, 5, 8 bits) that minimise the predicted KL at exactly the
    size budget, for each group size and symmetry; those candidates are verified as GPTQ with
    their widths and written as a `mixed` stage that replays the allocation.

    Examples:

      tinyllm plan smollm2-135m --max-size 0.35x

      tinyllm plan smollm2-135m --max-size 110MiB --max-ppl-ratio 1.2 -o plans/110
    """
    from tinyllm.pipeline.planner import make_plan, plan_markdown, write_plan
    from tinyllm.pipeline.recipe import Calibration, Evaluation

    try:
        cal = Calibration(corpus=calib_corpus, samples=samples, seq_len=seq_len)
        ev = Evaluation(corpus=eval_corpus, windows=eval_windows, seq_len=eval_seq_len)
    except ValueError as exc:
        raise ConfigError(f"plan: {_first_error(exc)}") from exc
    if verify_top < 1:
        raise ConfigError("--verify-top must be at least 1")
    p = make_plan(
        model,
        max_size,
        max_ppl_ratio,
        max_latency,
        cal,
        ev,
        probe_windows,
        probe_seq_len,
        verify_top,
        cache=output / "sensitivity.json",
        mixed=mixed,
    )
    files = write_plan(p, output, cal.model_dump())
    out.print(plan_markdown(p), highlight=False, soft_wrap=True)
    if p.recommended is None:
        out.print("no verified candidate met the budget; see the table above")
    else:
        out.print(files["recipe"].read_text(), highlight=False, soft_wrap=True)
        out.print(f"recommended recipe: {files['recipe']} (tinyllm run {files['recipe']})")
    out.print(f"wrote {', '.join(str(f) for f in files.values())}")


KvOpt = Annotated[
    float, typer.Option("--kv-memory", help="MiB preallocated for the paged KV cache.")
]
KvDtypeOpt = Annotated[
    str,
    typer.Option(
        "--kv-dtype",
        help="KV cache precision: float16 (half the memory and traffic, like llama.cpp) or "
        "float32 (exactly what transformers keeps).",
    ),
]


Int8ActOpt = Annotated[
    bool,
    typer.Option(
        "--int8-act",
        help="Run 4-bit layers on integer kernels with activations rounded to int8 per block of "
        "32 (AVX512-VNNI; like llama.cpp's Q4_0 x Q8_0): faster, no longer bit-exact.",
    ),
]


def _engine(
    model: str, kv_memory: float, kv_dtype: str = "float16", int8_act: bool = False, **sched: object
):
    from tinyllm.models.load import load
    from tinyllm.runtime.engine import Engine, EngineConfig
    from tinyllm.runtime.scheduler import SchedulerConfig

    m, tok = load(model)
    cfg = EngineConfig(
        kv_memory_mb=kv_memory,
        kv_dtype=kv_dtype,
        int8_activations=int8_act,
        scheduler=SchedulerConfig(**sched),
    )
    return Engine(m, tok, cfg)


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt in the model's chat template.")
    ] = False,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(min=0, help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="Keep the k likeliest tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option(min=0.01, max=1, help="Nucleus mass.")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(min=0.01, help="1 = off.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    kv_memory: KvOpt = 64.0,
    kv_dtype: KvDtypeOpt = "float16",
    int8_act: Int8ActOpt = False,
) -> None:
    """Generate text with the tinyllm runtime, streaming tokens as they come.

    Runs FP, quantized (packed INT4/INT8 kernels) and pruned Llama-family checkpoints directly.
    Example: tinyllm generate runs/edge/final "The capital of France is" --max-tokens 20
    """
    from tinyllm.runtime.sampling import SamplingParams

    engine = _engine(model, kv_memory, kv_dtype, int8_act)
    params = _make_step(
        SamplingParams,
        "sampling",
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop or [],
    )
    ids = engine.prompt_ids(prompt, chat=chat)
    seq = engine.submit(ids, params, sink=lambda ev: out.print(ev.text, end="", highlight=False))
    while seq.finish_reason is None:
        engine.step()
    out.print()
    rate = (
        (len(seq.token_times) - 1) / max(1e-9, seq.token_times[-1] - seq.token_times[0])
        if len(seq.token_times) > 1
        else float("nan")
    )
    err.print(
        f"[dim]{len(seq.output)} tokens, finish: {seq.finish_reason}, decode {rate:.1f} tokens/s[/]"
    )


@app.command()
def bench(
    model: ModelArg,
    concurrency: Annotated[str, typer.Option(help="Comma-separated stream counts.")] = "1,4,16",
    prompt_len: Annotated[int, typer.Option(min=1, help="Prompt tokens per stream.")] = 64,
    gen_len: Annotated[int, typer.Option(min=1, help="Tokens generated per stream.")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Runs per level; the median is shown.")] = 3,
    kv_memory: KvOpt = 256.0,
    kv_dtype: KvDtypeOpt = "float16",
    int8_act: Int8ActOpt = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write rows here.")] = None,
) -> None:
    """Serve N concurrent streams and print TTFT, inter-token latency p50/p95/p99, tokens/s, KV.

    Example: tinyllm bench runs/edge/final --concurrency 1,4,16 --prompt-len 64 --gen-len 64
    """
    from tinyllm.runtime.bench import bench as run_bench

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(
            f"--concurrency takes numbers like 1,4,16 (got '{concurrency}')"
        ) from None
    if not levels or min(levels) < 1:
        raise ConfigError(f"--concurrency takes positive numbers like 1,4,16 (got '{concurrency}')")
    engine = _engine(
        model, kv_memory, kv_dtype, int8_act, max_batch=max(levels), max_queue=max(levels) * 2
    )
    rows = run_bench(engine, levels, prompt_len, gen_len, repeats)
    t = Table(title=f"tinyllm bench {model} (prompt {prompt_len}, generate {gen_len})")
    for col in (
        "streams",
        "tokens/s",
        "decode tok/s",
        "TTFT p50 ms",
        "ITL p50 ms",
        "ITL p95 ms",
        "ITL p99 ms",
        "KV peak MiB",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r.concurrency),
            f"{r.tokens_per_s:.1f}",
            f"{r.decode_tokens_per_s:.1f}",
            f"{r.ttft_p50_ms:.0f}",
            f"{r.itl_p50_ms:.1f}",
            f"{r.itl_p95_ms:.1f}",
            f"{r.itl_p99_ms:.1f}",
            f"{r.kv_peak_mib:.1f}",
        )
    out.print(t)
    out.print(f"KV bytes per token: {rows[0].kv_bytes_per_token:,}")
    if json_out:
        from tinyllm.util.fs import write_json_atomic

        write_json_atomic(json_out, [r.to_dict() for r in rows])


@app.command()
def serve(
    model: ModelArg,
    host: Annotated[
        str, typer.Option(help="Interface to bind (0.0.0.0 exposes it).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            help="Accept this key (repeatable; each key is its own tenant). Keys also come from "
            "--api-key-file, --tenants and TINYLLM_API_KEYS (comma-separated); none: no auth, "
            "allowed only on loopback unless --insecure."
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File of API keys, one a line (# comments).")
    ] = None,
    tenants: Annotated[
        Path | None,
        typer.Option(
            help="YAML: tenants: [{name, key, weight > 0, priority, max_concurrency >= 1, "
            "max_queue >= 1}]"
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Allow binding beyond loopback with no API key (warns).")
    ] = False,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            help="Host header name to answer besides IP literals, localhost and --host "
            "(repeatable; '*' for any). Others get 421 (DNS rebinding guard)."
        ),
    ] = None,
    public_metrics: Annotated[
        bool, typer.Option(help="Serve /metrics without a key even when keys are set.")
    ] = False,
    request_timeout: Annotated[
        float,
        typer.Option(min=1, help="Seconds a request may take in all; then 503 + Retry-After."),
    ] = 600.0,
    max_queue_wait: Annotated[
        float,
        typer.Option(min=0.1, help="Seconds a request may wait to start; then 429 + Retry-After."),
    ] = 120.0,
    name: Annotated[
        str | None, typer.Option(help="Model id the API shows (default: MODEL).")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoding at once.")] = 32,
    max_queue: Annotated[int, typer.Option(min=1, help="Waiting requests before 429.")] = 256,
    target_itl: Annotated[
        float | None,
        typer.Option(
            help="Target p95 inter-token latency, ms: "
            "the batch shrinks above it and new work gets 429."
        ),
    ] = None,
    kv_memory: KvOpt = 256.0,
    kv_dtype: KvDtypeOpt = "float16",
    int8_act: Int8ActOpt = False,
) -> None:
    """OpenAI-compatible server: /v1/completions, /v1/chat/completions (SSE streaming),
    /v1/models, /health, /metrics (Prometheus).

    Example: tinyllm serve runs/edge/final --api-key sk-local --target-itl 80
    then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
    """
    from tinyllm.runtime.server import ServerLimits, check_exposure, load_tenants
    from tinyllm.runtime.server import serve as run_server

    keys = load_tenants(
        str(tenants) if tenants else None,
        api_key or [],
        str(api_key_file) if api_key_file else None,
    )
    check_exposure(host, keys, insecure)
    limits = ServerLimits(
        request_timeout=request_timeout,
        max_queue_wait=max_queue_wait,
        bind_host=host,
        allowed_hosts=tuple(allowed_host or ()),
        public_metrics=public_metrics,
    )
    target = None if target_itl is None else target_itl / 1000
    engine = _engine(
        model,
        kv_memory,
        kv_dtype,
        int8_act,
        max_batch=max_batch,
        max_queue=max_queue,
        target_itl_p95=target,
    )
    err.print(
        f"serving {name or model} on http://{host}:{port}/v1 "
        f"({'API keys required' if keys else 'no auth'}); Ctrl-C stops"
    )
    run_server(engine, name or model, keys, host, port, limits)


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


def _check_calib_dtype(name: str) -> None:
    from tinyllm.core.kernels import CALIB_DTYPES

    if name not in CALIB_DTYPES:
        raise ConfigError(f"--calib-dtype must be one of {', '.join(CALIB_DTYPES)}, got '{name}'")


def _make_step(cls: type, method: str, **options: object) -> object:
    """Build a step config from the CLI options it accepts; pydantic errors become one line."""
    from pydantic import ValidationError

    fields = cls.model_fields
    try:
        return cls(**{k: v for k, v in options.items() if k in fields})
    except ValidationError as exc:
        raise ConfigError(f"{method}: {_first_error(exc)}") from exc


def _first_error(exc: object) -> str:
    """'field: message' of a pydantic ValidationError's first error (no field: the message)."""
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def _eval_rows(r: object) -> list[tuple[str, str]]:
    rows = [
        ("corpus", f"{r.corpus} ({r.windows} x {r.seq_len}, {r.tokens:,} tokens scored)"),
        ("perplexity", f"{r.perplexity:.4f}"),
    ]
    if r.kld is not None:
        rows += [
            ("KL(reference || model)", f"{r.kld:.6f}"),
            ("top-1 agreement", f"{r.top1_agreement:.4f}"),
        ]
    rows += [
        ("parameters", f"{r.params:,}"),
        ("size in memory", human_bytes(r.size_bytes)),
        ("bits per weight (linears)", f"{r.bits_per_weight:.3f}"),
        ("sparsity (linears)", f"{r.sparsity:.2%}"),
        ("eval seconds", f"{r.eval_seconds:.1f}"),
        ("tokens per second", f"{r.tokens_per_second:.0f}"),
        ("peak RSS", human_bytes(r.peak_rss_bytes)),
    ]
    return rows


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)],
    )


def main() -> None:
    """Entry point: a TinyLLMError prints one line and exits 1; Ctrl-C exits 130."""
    _setup_logging("-v" in sys.argv or "--verbose" in sys.argv)
    argv = [a for a in sys.argv[1:] if a not in ("-v", "--verbose")]
    if "--no-verify" in argv:  # a global option, also accepted after the command
        argv = ["--no-verify", *[a for a in argv if a != "--no-verify"]]
    try:
        app(args=argv, standalone_mode=True)
    except TinyLLMError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
