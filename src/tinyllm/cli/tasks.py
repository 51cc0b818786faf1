"""`tinyllm tasks`: the built-in tasks, exporting them for lm-eval, and lm-eval's own runner."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tinyllm.cli._common import help_text, out
from tinyllm.cli.app import app

TASKS_HELP = """Task accuracy: the built-in tasks (offline, from data shipped in registry
packages) and lm-evaluation-harness tasks. Score a model on them with
`tinyllm eval MODEL --tasks analogy,polarity` (lm-eval task names and task YAML paths work there
too with the tasks extra: pip install 'tinyllm\\[tasks]'). docs/tasks.md describes them."""

EXPORT_HELP = """Write a built-in task as DIR/NAME.jsonl (its questions) and DIR/NAME.yaml (an
lm-eval task over that file, scored exactly as tinyllm scores it), for lm-eval's own runner.

Example:

  tinyllm tasks export polarity tasks/
  tinyllm tasks lm-eval --model tinyllm --model_args pretrained=smollm2-135m \\
      --tasks polarity --include_path tasks/"""

LM_EVAL_HELP = """lm-evaluation-harness's own command line (lm_eval) with the model "tinyllm"
registered: --model tinyllm --model_args pretrained=SPEC runs lm-eval on any model tinyllm
loads (registered names, Hugging Face and tinyllm directories, .gguf files). Every argument is
passed to lm_eval unchanged. Generation is greedy.

Example:

  tinyllm tasks lm-eval --model tinyllm --model_args pretrained=smollm2-135m \\
      --tasks arc_easy --limit 100"""

tasks_app = typer.Typer(help=help_text(TASKS_HELP), no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")


def _row(name: str) -> tuple[str, str, str, str, str]:
    from tinyllm.data.tasks import builtin_task
    from tinyllm.errors import TinyLLMError

    try:
        task = builtin_task(name)
    except TinyLLMError as exc:  # e.g. wiki-next without its corpus
        return name, "", "", "", f"unavailable: {exc}"
    return name, task.kind, str(len(task.docs)), task.metric, task.description


@tasks_app.command("list", help="The built-in tasks (size, metric), and whether lm-eval is here.")
def list_tasks() -> None:
    from tinyllm.data.tasks import BUILTIN
    from tinyllm.eval.lmeval import INSTALL_HINT, lm_eval_version

    table = Table(title="built-in tasks", title_justify="left")
    for col in ("task", "kind", "questions", "metric", "description"):
        table.add_column(col, justify="right" if col == "questions" else "left")
    for name in BUILTIN:
        table.add_row(*_row(name))
    out.print(table)
    version = lm_eval_version()
    if version:
        out.print(f"lm-evaluation-harness {version}: lm-eval task names and task YAML files work")
    else:
        out.print(f"lm-evaluation-harness: not installed ({INSTALL_HINT})", markup=False)


@tasks_app.command(help=help_text(EXPORT_HELP))
def export(
    name: Annotated[str, typer.Argument(help="A built-in task (tinyllm tasks list).")],
    directory: Annotated[Path, typer.Argument(help="Where NAME.jsonl and NAME.yaml go.")],
) -> None:
    from tinyllm.data.tasks import builtin_task
    from tinyllm.eval.lmeval import export_task

    data, config = export_task(builtin_task(name), directory)
    out.print(f"wrote {data} and {config}")


@tasks_app.command(
    "lm-eval",
    help=help_text(LM_EVAL_HELP),
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def lm_eval(ctx: typer.Context) -> None:
    from tinyllm.eval.lmeval import lm_eval_cli

    lm_eval_cli(ctx.args)
