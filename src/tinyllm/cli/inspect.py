"""`tinyllm info`, `eval` and `outliers`: look at a model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tinyllm.cli._common import (
    CalibCorpusOpt,
    DeviceOpt,
    JsonOpt,
    ModelArg,
    SamplesOpt,
    SeedOpt,
    SeqLenOpt,
    _eval_rows,
    _table,
    device_of,
    human_bytes,
    out,
)
from tinyllm.cli._gates import BaselineOpt, GateOpt, JunitOpt, enforce_gates, prepare_gates
from tinyllm.cli.app import app

if TYPE_CHECKING:
    from tinyllm.eval.evaluate import EvalResult


@app.command()
def info(
    model: ModelArg = "smollm2-135m",
    json_out: JsonOpt = None,
) -> None:
    """Architecture, parameter counts, shapes, dtype and size of a model."""
    from tinyllm.core.load import load
    from tinyllm.models.info import model_info

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


CORPUS_HELP = (
    "A named corpus (enwiki, bgwiki, crime-and-punishment, lee-news), a UTF-8 .txt, a .jsonl or "
    "a directory."
)


@app.command("eval")
def eval_(
    model: ModelArg = "smollm2-135m",
    corpus: Annotated[str, typer.Option(help=CORPUS_HELP)] = "enwiki",
    seq_len: Annotated[int, typer.Option(help="Tokens per window (at least 2).")] = 512,
    windows: Annotated[int, typer.Option(help="Windows from the corpus's evaluation slice.")] = 40,
    reference: Annotated[
        str | None,
        typer.Option(
            help="Also report KL(reference || model) and top-1 agreement against this model."
        ),
    ] = None,
    json_out: JsonOpt = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Windows per forward (default: 2048 tokens).")
    ] = None,
    fast: Annotated[
        bool, typer.Option(help="Run fp32 linears through oneDNN while scoring (CPU only).")
    ] = True,
    device: DeviceOpt = "auto",
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Also score these tasks, comma-separated: built-in (analogy, analogy-gen, "
            "polarity, wiki-next; `tinyllm tasks list`), lm-eval task names and task YAML "
            "paths (pip install 'tinyllm[tasks]'). Accuracy +- standard error each."
        ),
    ] = None,
    task_limit: Annotated[
        int | None, typer.Option(min=1, help="Score only each task's first N questions.")
    ] = None,
    gate: GateOpt = None,
    baseline: BaselineOpt = None,
    junit: JunitOpt = None,
) -> None:
    """Perplexity (and KLD/agreement with --reference), task accuracy (--tasks), size, bits per
    weight, speed, memory, energy; regression gates (--gate) for CI.

    Protocol: the corpus is tokenized without special tokens; WINDOWS back-to-back windows of
    SEQ_LEN tokens are cut from its evaluation slice (its first 65,536 tokens); BOS is prepended
    only when the tokenizer adds one by default; every position after the first is scored.
    Tasks are scored as docs/tasks.md describes, the way lm-evaluation-harness scores them.
    """
    from tinyllm.data.windows import check_seq_len
    from tinyllm.eval.tasks import check_task_names

    check_seq_len(seq_len)  # fail before loading anything
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    check_task_names(names)
    gates, base = prepare_gates(gate, baseline, junit)  # so do bad gates and baselines
    options = dict(corpus=corpus, seq_len=seq_len, windows=windows, batch_size=batch_size)
    options.update(fast=fast, tasks=names, task_limit=task_limit)
    result = _evaluate(model, reference, device_of(device), options)
    out.print(_table(f"tinyllm eval {model}", _eval_rows(result)))
    if json_out:
        result.save_json(json_out)
        out.print(f"wrote {json_out}")
    enforce_gates(result.to_dict(), gates, base, junit, f"tinyllm eval {model}")


def _evaluate(model: str, reference: str | None, where: str, options: dict) -> EvalResult:
    """Load `model` (and `reference`) lean for inference and score them (eval.evaluate)."""
    from tinyllm.core.load import load
    from tinyllm.eval.evaluate import evaluate

    lean = where == "cpu"  # codes held once, a large model's tables narrow (tinyllm.load)
    m, tok = load(model, inference=lean)
    ref = load(reference, inference=lean) if reference else None
    return evaluate(m, tok, reference=ref, name=model, device=where, **options)


@app.command()
def outliers(
    model: ModelArg,
    samples: SamplesOpt = 16,
    seq_len: SeqLenOpt = 512,
    calib_corpus: CalibCorpusOpt = "enwiki",
    seed: SeedOpt = 0,
    top: Annotated[int, typer.Option(help="Rows to print, worst first (0: all).")] = 20,
    json_out: JsonOpt = None,
) -> None:
    """Show each linear layer's input outliers: why a model resists W8A8.

    For every block linear: the largest per-channel |input| over calibration windows, the ratio
    of the largest channel to the median channel, and `levels`, how many of an 8-bit per-tensor
    grid's 127 steps the median channel gets. Ratios in the hundreds (few levels) are what
    SmoothQuant (`tinyllm quantize --method smoothquant`) flattens.

    Example: tinyllm outliers smollm2-135m --samples 16 --top 10
    """
    from tinyllm.core.load import load
    from tinyllm.data.calibration import calibration_windows
    from tinyllm.quant.outliers import outlier_report

    m, tok = load(model)
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
