"""`tinyllm estimate`: peak memory and run time of a job, predicted from config.json alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tinyllm.cli._common import JsonOpt, SamplesOpt, SeqLenOpt, help_text, out
from tinyllm.cli.app import app
from tinyllm.util.units import human_bytes

ESTIMATE_HELP = """Predict the peak memory (RSS) and run time of a job from the model's config.json
alone: no weights are read, so it answers for models that do not fit this machine.

MODEL is a registered name, a Hugging Face or tinyllm directory, or a path to a config.json.
Jobs: compress (the streaming, block-by-block path of quantize and prune, with --method and its
calibration), eval (`tinyllm eval`'s defaults), generate (64 tokens). Time is FLOPs over this
host's float32 matmul rate and bytes over its memory bandwidth, both measured once by a short
micro-benchmark and cached; every part and assumption is printed. docs/sizing.md lists the
constants and how close the estimates came to measured runs.

Examples:

  tinyllm estimate /work/synth/llama-3.1-8b --method gptq --bits 4 --samples 128 --seq-len 512

  tinyllm estimate smollm2-135m --job eval --method gptq --bits 4 --json -"""


def _table(est: object) -> Table:
    table = Table(title=est.summary(), title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for k, v in est.memory.items():
        table.add_row(f"memory: {k}", human_bytes(v))
    table.add_row("peak RSS", f"[bold]{human_bytes(est.peak_bytes)}[/]")
    if est.device_bytes:
        table.add_row("GPU memory", f"[bold]{human_bytes(est.device_bytes)}[/]")
    for k, v in est.time.items():
        table.add_row(f"time: {k}", f"{v:.1f} s")
    table.add_row("run time", f"[bold]{est.seconds:.0f} s[/]")
    return table


@app.command(help=help_text(ESTIMATE_HELP))
def estimate(
    model: Annotated[
        str, typer.Argument(help="Registered name, HF or tinyllm directory, or a config.json.")
    ],
    job: Annotated[str, typer.Option(help="compress, eval or generate.")] = "compress",
    method: Annotated[
        str | None,
        typer.Option(
            help="Compression method (gptq, awq, rtn, wanda, sparsegpt, ...); compress defaults "
            "to gptq; for eval/generate, the method the model will have been compressed with "
            "(none: as stored)."
        ),
    ] = None,
    bits: Annotated[int, typer.Option(help="Weight bits of a quantization method.")] = 4,
    group_size: Annotated[int, typer.Option(help="Quantization group size (-1: per row).")] = 128,
    samples: SamplesOpt = 128,
    seq_len: SeqLenOpt = 512,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (auto: cpu here).")] = "cpu",
    stream: Annotated[
        str,
        typer.Option(
            help="compress: on (one block at a time), off (the model whole in float32) or auto "
            "(as quantize decides: streamed when the float32 weights exceed half the memory "
            "available now)."
        ),
    ] = "auto",
    json_out: JsonOpt = None,
    remeasure: Annotated[
        bool, typer.Option(help="Measure the host's speed again instead of the cached rates.")
    ] = False,
) -> None:
    from tinyllm.core.estimate import Job, host_profile
    from tinyllm.core.estimate import estimate as run_estimate

    if method is None and job == "compress":
        method = "gptq"
    spec = Job(job, method, bits, group_size, samples, seq_len, device, stream)
    host = host_profile("cpu" if device == "auto" else device, refresh=remeasure)
    est = run_estimate(model, spec, host)
    if json_out is not None and str(json_out) == "-":
        out.print_json(json.dumps(est.to_dict()))
        return
    out.print(_table(est))
    for line in est.assumptions:
        out.print(f"[dim]assumed: {line}[/]", highlight=False, soft_wrap=True)
    if json_out is not None:
        from tinyllm.util.fs import write_json_atomic

        write_json_atomic(Path(json_out), est.to_dict())
