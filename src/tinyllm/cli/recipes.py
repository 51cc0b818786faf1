"""`tinyllm run`, `recipes`, `report` and `plan`: recipes and the planner."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinyllm.cli._common import (
    CalibCorpusOpt,
    ModelArg,
    SamplesOpt,
    SeqLenOpt,
    err,
    help_text,
    out,
)
from tinyllm.cli.app import app
from tinyllm.core import registry
from tinyllm.errors import ConfigError

RUN_HELP = """Run a recipe: stages in order (distill -> prune -> quantize is the recommended order),
each checkpointed and scored, then the exports and the report.

After every stage the model is saved atomically to OUTPUT/stages/NN-TYPE and scored against
the original (perplexity, KLD, top-1 agreement, size on disk, bits per weight, time, peak
RSS). Each exported file is scored the same way through the runtime that reads it (GGUF:
llama.cpp, ONNX: onnxruntime, hf: transformers), a row of its own in the table; a runtime that
is missing is recorded as "not scored: WHY". A run killed at any point continues with
--resume after its last finished stage (a training stage continues from its own last
checkpoint). OUTPUT gets report.md and report.html
(`tinyllm report` rebuilds them). A run locks OUTPUT (.OUTPUT.lock beside it): a second run into
it fails at once.

Gates: `gates: ['kld<=0.1', 'ppl_ratio<=1.2']` inside a stage is checked right after that stage is
scored; a top-level `gates:` on the last stage, before the exports, then on each exported
file's scores (its ppl, KLD, top-1, size and tasks). A failed gate (or a metric
the run did not measure) stops the run with exit code 1; the stage is marked in the table,
report.md/html and OUTPUT/gates.xml (JUnit). Relative gates (VALUEx, ppl_ratio) compare with the
original model (docs/gates.md).

--resume after changing the recipe: changed gates are checked again on the stored scores and
the run continues; a changed stage is run again from there (the stages before it are kept); a
changed model, calibration or evaluation is refused, showing the difference.

A recipe is YAML, never code:

  model: smollm2-135m
  device: auto        # cpu, cuda, cuda:N; auto: a GPU when present
  calibration: {corpus: enwiki, samples: 128, seq_len: 512, seed: 0}
  evaluation: {corpus: enwiki, windows: 40, seq_len: 512}
  stages:
    - {type: wanda, sparsity: 0.3}
    - {type: recover, steps: 60}
    - {type: gptq, bits: 4, group_size: 32, sym: true, gates: ['kld<=0.15']}
  export: [{format: gguf, type: q4_0}]
  gates: ['ppl_ratio<=1.3', 'top1>=0.8']

STAGES_HELP

Examples:

  tinyllm recipes

  tinyllm run edge -o runs/edge

  tinyllm run my-recipe.yaml -o runs/mine --resume
"""

# the stage types paragraph of `run --help`, from the step registry (core/registry.py)
STAGES_HELP = (
    f"Stage types: {', '.join(registry.names('prune'))} (pruning); "
    f"{', '.join(registry.names('quantize'))} (quantization; awq and mixed take "
    "base: {type: gptq, bits: 4, ...}); "
    f"{', '.join(registry.names('train'))} (training; distill takes layers: N for a "
    "layer-dropped student). Fields are those of the Python step configs (docs/recipes.md)."
)

PLAN_HELP = """Search quantization recipes against a budget; print the Pareto front and the
recommendation.

Measures each block linear's sensitivity (KL to the original with only that layer quantized,
on calibration windows), predicts size (exactly) and KL of every uniform grid (bits 2-8,
groups 32/64/128/per-channel, symmetric or not), quantizes the best few that fit with GPTQ and
scores them with the evaluation harness. Writes OUTPUT/plan.md, plan.json, front.png and
OUTPUT/recommended.yaml, a recipe `tinyllm run` accepts. With --mixed (default) it also
allocates per-layer widths (2, 3, 4, 5, 8 bits) that minimise the predicted KL at exactly the
size budget, for each group size and symmetry; those candidates are verified as GPTQ with
their widths and written as a `mixed` stage that replays the allocation. It also offers GGUF
type mixes (a llama.cpp type per layer: Q2_K..Q6_K, Q4_0, Q5_0, Q8_0), their block linears
sized as the GGUF file holds them, written with a `--type auto` GGUF export.

The recommendation is the best verified candidate by --objective: kld (default, the measured
KL divergence to the original), ppl (measured perplexity) or task:NAME (accuracy on a built-in
task such as analogy, scored on the original and on every verified candidate; --task-limit
caps its documents; ties go to the lower KLD). The search itself ranks by predicted KLD.

Examples:

  tinyllm plan smollm2-135m --max-size 0.35x

  tinyllm plan smollm2-135m --max-size 110MiB --max-ppl-ratio 1.2 -o plans/110

  tinyllm plan smollm2-135m --max-size 0.35x --objective task:analogy --verify-top 5
"""


@app.command("run", help=help_text(RUN_HELP.replace("STAGES_HELP", STAGES_HELP)))
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
    from tinyllm.pipeline.recipe import load_recipe, resolve_recipe
    from tinyllm.pipeline.report import markdown_table, stage_line
    from tinyllm.pipeline.runner import StageGateError, run_recipe

    if check and (output or resume or overwrite):
        raise ConfigError("--check only validates the recipe: drop -o/--resume/--overwrite")
    path = resolve_recipe(recipe)
    rec = load_recipe(path)
    for w in rec.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    if check:
        out.print(f"{path}: valid; model {rec.model}, device {rec.device}")
        for line in rec.outline():
            out.print(f"  {line}", highlight=False, soft_wrap=True)
        return
    output = output or Path("runs") / path.stem
    text = path.read_text(encoding="utf-8")
    try:
        state = run_recipe(rec, text, output, resume, overwrite, lambda r: out.print(stage_line(r)))
    except StageGateError as exc:  # the table with the failed stage, then the one-line error
        out.print(markdown_table(exc.state), highlight=False, soft_wrap=True)
        raise
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

    md, page = write_report(run_dir)  # a missing or corrupt state.json is a one-line error
    out.print(f"wrote {md} and {page}")


MaxSizeOpt = Annotated[
    str,
    typer.Option(
        help="Size budget on disk: 90MB, 85MiB, 1.5GB, or 0.35x (a fraction of the float16 size)."
    ),
]
PlanOutputOpt = Annotated[
    Path, typer.Option("-o", "--output", help="Directory for plan.md/json, front.png, recipe.")
]
MixedOpt = Annotated[
    bool,
    typer.Option(
        help="Also search per-layer bit widths (2/3/4/5/8) and per-layer GGUF types filling the "
        "budget."
    ),
]


MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        help="Memory budget (16GB, or 0.5x of this host's); default: the host's memory. A "
        "plan whose GPTQ compression or 4-bit serving `tinyllm estimate` predicts above it "
        "is refused before anything loads."
    ),
]


ObjectiveOpt = Annotated[
    str,
    typer.Option(
        help="What picks the recommendation among the verified candidates: kld, ppl or "
        "task:NAME (a built-in task's accuracy, e.g. task:analogy)."
    ),
]
TaskLimitOpt = Annotated[
    int | None,
    typer.Option(min=1, help="At most this many documents of the objective's task."),
]


@app.command(help=help_text(PLAN_HELP))
def plan(
    model: ModelArg,
    max_size: MaxSizeOpt,
    max_ppl_ratio: Annotated[
        float | None, typer.Option(help="Largest perplexity ratio to the original.")
    ] = None,
    max_latency: Annotated[
        float | None, typer.Option(help="Largest decode latency, ms per token (checked for real).")
    ] = None,
    output: PlanOutputOpt = Path("plan"),
    verify_top: Annotated[
        int, typer.Option(help="Best predicted candidates quantized and scored for real.")
    ] = 3,
    probe_windows: Annotated[int, typer.Option(help="Calibration windows for sensitivity.")] = 2,
    probe_seq_len: Annotated[int, typer.Option(help="Tokens per sensitivity window.")] = 256,
    calib_corpus: CalibCorpusOpt = "enwiki",
    samples: SamplesOpt = 128,
    seq_len: SeqLenOpt = 512,
    eval_corpus: Annotated[str, typer.Option(help="Corpus of the verification scores.")] = (
        "enwiki"
    ),
    eval_windows: Annotated[int, typer.Option(help="Evaluation windows.")] = 40,
    eval_seq_len: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 512,
    mixed: MixedOpt = True,
    max_memory: MaxMemoryOpt = None,
    objective: ObjectiveOpt = "kld",
    task_limit: TaskLimitOpt = None,
) -> None:
    from tinyllm.pipeline.planner import make_plan, plan_markdown, plan_settings, write_plan

    cal, ev = plan_settings(
        {"corpus": calib_corpus, "samples": samples, "seq_len": seq_len},
        {"corpus": eval_corpus, "windows": eval_windows, "seq_len": eval_seq_len},
        verify_top,
    )
    p = make_plan(
        model,
        max_size,
        max_ppl_ratio,
        max_latency,
        cal,
        ev,
        probe_windows=probe_windows,
        probe_seq_len=probe_seq_len,
        verify_top=verify_top,
        cache=output / "sensitivity.json",
        mixed=mixed,
        max_memory=max_memory,
        objective=objective,
        task_limit=task_limit,
    )
    files = write_plan(p, output, cal.model_dump())
    out.print(plan_markdown(p), highlight=False, soft_wrap=True)
    if p.recommended is None:
        out.print("no verified candidate met the budget; see the table above")
    else:
        out.print(files["recipe"].read_text(), highlight=False, soft_wrap=True)
        out.print(f"recommended recipe: {files['recipe']} (tinyllm run {files['recipe']})")
    out.print(f"wrote {', '.join(str(f) for f in files.values())}")
