"""Options, consoles and helpers shared by the command modules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tinyllm.errors import ConfigError
from tinyllm.util.device import DEVICE_HELP
from tinyllm.util.units import human_bytes

out = Console()
err = Console(stderr=True)


ModelArg = Annotated[
    str, typer.Argument(help="Registered name, HF directory, .gguf file or tinyllm dir.")
]


def help_text(text: str) -> str:
    """A command's --help text: each prose paragraph joined into one line (the terminal wraps
    it), paragraphs with indented lines (examples, YAML) kept line for line."""
    paragraphs = text.strip().split("\n\n")
    return "\n\n".join(
        p if any(line.startswith(" ") for line in p.splitlines()) else " ".join(p.split("\n"))
        for p in paragraphs
    )


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, value)
    return table


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


# --- option groups shared by several commands: one definition each -------------------------
# calibration windows (quantize, prune, outliers, plan)
CalibCorpusOpt = Annotated[
    str,
    typer.Option(
        "--calib-corpus",
        help="Corpus of the calibration windows: a named one (enwiki, bgwiki, "
        "crime-and-punishment, lee-news), a .txt, a .jsonl or a directory (its training part; "
        "never the evaluation slice), or a mix joined by '+' (enwiki+bgwiki+lee-news: an equal "
        "share of the windows from each).",
    ),
]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Calibration windows.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the calibration sample.")]
# outputs
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace an existing output (a directory only if tinyllm wrote it)."
    ),
]
OutputDirOpt = Annotated[Path, typer.Option("-o", "--output", help="Output directory.")]
JsonOpt = Annotated[
    Path | None, typer.Option("--json", help="Also write the results to this JSON file.")
]

KvOpt = Annotated[
    float, typer.Option("--kv-memory", help="MiB preallocated for the paged KV cache.")
]


KvDtypeOpt = Annotated[
    str,
    typer.Option(
        "--kv-dtype",
        help="KV cache precision: float16 (half the memory and traffic, like llama.cpp), "
        "float32 (exactly what transformers keeps) or int8 (a scale per token and head: about "
        "half of float16's bytes; lean runtime only).",
    ),
]


SpeculateOpt = Annotated[
    int,
    typer.Option(
        "--speculate",
        min=0,
        max=16,
        help="Speculative decoding: each decoding request proposes up to K tokens and one "
        "forward verifies them. Drafts come from --draft's model, else by prompt lookup (what "
        "followed the latest earlier occurrence of the last 3 tokens: fast where text repeats, "
        "as in summaries, code edits, extraction). Greedy output is plain decoding's; sampled "
        "requests use speculative sampling, distributed as plain sampling. 0: off (4 with "
        "--draft).",
    ),
]
DraftOpt = Annotated[
    str | None,
    typer.Option(
        "--draft",
        help="Draft model for --speculate (anything MODEL takes): a smaller model with the same "
        "tokenizer, such as `tinyllm prune MODEL --method blocks` or a lower-bit copy. It "
        "proposes greedily, the model verifies: the output does not depend on it, the speed "
        "does (bench it).",
    ),
]
Int8ActOpt = Annotated[
    bool,
    typer.Option(
        "--int8-act",
        help="Run 4-bit layers on integer kernels with activations rounded to int8 per block of "
        "32 (AVX512-VNNI or AVX2; like llama.cpp's Q4_0 x Q8_0), prompts too: faster, no longer "
        "bit-exact. Lean forward only (Llama, Qwen2, Mistral, Gemma 3): refused where a model "
        "falls back to transformers.",
    ),
]


DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help=f"Where the model computes: {DEVICE_HELP}. On a GPU, results match the CPU's to "
        "float rounding, not bit for bit; without a GPU, auto is cpu.",
    ),
]


StreamResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue an interrupted streamed run (one-step gptq, awq, rtn or nf4) from its "
        "last finished block, kept in OUTPUT.stream0 with the calibration activations; the "
        "same source, settings and calibration are checked. The result is the uninterrupted "
        "run's, byte for byte. Other runs start from block 0.",
    ),
]


StreamOpt = Annotated[
    str,
    typer.Option(
        "--stream",
        help="auto, on or off. On: read, compress and write one decoder block at a time (peak "
        "memory about one block, the embeddings and the calibration activations; the output is "
        "sharded). Auto streams a Hugging Face model whose float32 weights exceed half of the "
        "memory available. Streams gptq, awq, rtn, nf4, wanda, sparsegpt, smoothquant, "
        "int8-static, mixed (with --allocation or a filled --sensitivity-cache) and "
        "channels/heads/blocks pruning (activation importance), from a Hugging "
        "Face model or a float or pruned tinyllm checkpoint; other methods and quantized "
        "checkpoints load the model whole.",
    ),
]


OffloadOpt = Annotated[
    str,
    typer.Option(
        "--offload",
        help="auto, on or off: keep the calibration activations in CPU memory while blocks "
        "compute on a GPU, each batch copied over when used (for a GPU too small for them). "
        "Auto offloads when they would take over a quarter of the GPU's free memory; on the "
        "CPU there is nothing to offload to.",
    ),
]


def device_of(spec: str) -> str:
    """--device checked before anything loads: its torch name ('cpu', 'cuda', 'cuda:1'), or a
    ConfigError saying what this machine has."""
    from tinyllm.util.device import resolve_device

    try:
        return str(resolve_device(spec))
    except ConfigError as exc:
        raise ConfigError(f"--device: {exc}") from None


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
    from tinyllm.util.validation import first_error

    return first_error(exc)


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
    rows += [(f"task {name}", task_cell(t)) for name, t in (r.tasks or {}).items()]
    rows += [
        ("parameters", f"{r.params:,}"),
        ("size in memory", human_bytes(r.size_bytes)),
        ("bits per weight (linears)", f"{r.bits_per_weight:.3f}"),
        ("sparsity (linears)", f"{r.sparsity:.2%}"),
        ("eval seconds", f"{r.eval_seconds:.1f}"),
        ("tokens per second", f"{r.tokens_per_second:.0f}"),
        ("peak RSS", human_bytes(r.peak_rss_bytes)),
        ("energy", energy_cell(r.joules_per_token, r.energy_source)),
    ]
    return rows


def task_cell(t: dict) -> str:
    """'0.4821 +- 0.0299 acc (n=280, 41 s)': a task's accuracy with its standard error."""
    return (
        f"{t['accuracy']:.4f} +- {t['stderr']:.4f} {t['metric']} (n={t['n']}, {t['seconds']:.0f} s)"
    )


def energy_cell(joules_per_token: float | None, source: str) -> str:
    """'0.0123 J/token (rapl (package-0))', or the source's own 'unavailable on this host: ...'."""
    if joules_per_token is None:
        return source
    return f"{joules_per_token:.4g} J/token ({source})"


def given_options(ctx: typer.Context) -> dict[str, object]:
    """The options the user set on the command line (their defaults left out)."""
    given = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)  # click's or typer's own ParameterSource
        if source is not None and source.name != "DEFAULT":
            given[name] = value
    return given


def flag_of(ctx: typer.Context, name: str) -> str:
    """How the user writes parameter `name`: '--group-size', '--sym/--asym'."""
    for p in ctx.command.params:
        if p.name == name:
            return "/".join([*p.opts, *p.secondary_opts])
    return "--" + name.replace("_", "-")
