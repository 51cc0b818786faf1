"""`tinyllm run`, `recipes`, `report` and `plan`: recipes and the planner."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinyllm.cli._common import (
    ModelArg,
    _first_error,
    err,
    human_bytes,
    out,
)
from tinyllm.cli.app import app
from tinyllm.errors import ConfigError


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
