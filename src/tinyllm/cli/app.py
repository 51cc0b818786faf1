"""The typer application every command module registers on."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    help="Compress a pretrained LLM, measure what each step cost, export it and serve it.\n\n"
    "MODEL is a registered name (smollm2-135m, gemma3-270m), a Hugging Face model directory, "
    "a .gguf file, or a tinyllm output directory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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
        from tinyllm.core.load import set_verify_default

        set_verify_default(False)
