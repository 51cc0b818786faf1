"""Issue 34 table: task accuracy of compressed models, each row through the CLI in its own process.

Run: .venv/bin/python benchmarks/bench_tasks.py [--rows MODEL/ROW,...] [--limit N] [--table]
Rows are MODEL/VARIANT for MODEL in smollm2-135m, gemma3-270m. Each row compresses with the CLI
(`tinyllm quantize|prune|run edge`, checkpoint kept in benchmarks/work/tasks/MODEL/VARIANT), then
runs `tinyllm eval DIR --reference MODEL --windows 8 --tasks <all built-in> --json`. Results are
merged into benchmarks/results/tasks.json row by row (an interrupted run resumes; --force reruns).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rowtable import row_args, rows_present, run_rows, table_head

OUT = Path(__file__).parent / "results" / "tasks.json"
KEEP = Path(__file__).parent / "work" / "tasks"
CLI = [sys.executable, "-m", "tinyllm.cli"]
TASKS = ["analogy", "analogy-gen", "polarity", "wiki-next"]
WINDOWS = "8"
SAMPLES = ["--samples", "64"]
VARIANTS: dict[str, list[str]] = {
    "fp32": [],
    "fp32-full": [],  # every question of every task: the suite's time (no --limit)
    "gptq-4b-g64": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "64", *SAMPLES],
    "awq-gptq-4b-g32": [
        *["quantize", "--method", "awq", "--base", "gptq", "--bits", "4", "--group-size", "32"],
        *SAMPLES,
    ],
    "gptq-3b-g32": ["quantize", "--method", "gptq", "--bits", "3", "--group-size", "32", *SAMPLES],
    "rtn-3b-g32": ["quantize", "--method", "rtn", "--bits", "3", "--group-size", "32"],
    "sparsegpt-50": ["prune", "--method", "sparsegpt", "--sparsity", "0.5", *SAMPLES],
    "sparsegpt-2:4": ["prune", "--method", "sparsegpt", "--pattern", "2:4", *SAMPLES],
    "edge": ["run"],
    # the edge recipe's exported GGUF (export/model-q4_0.gguf) scored through llama.cpp, on the
    # same windows and questions: what ships, not tinyllm's in-memory model
    "edge-gguf": [],
}
MODELS = ["smollm2-135m", "gemma3-270m"]
ROWS = [f"{m}/{v}" for m in MODELS for v in VARIANTS]


def compress(model: str, variant: str) -> tuple[str, float]:
    """The row's model (a checkpoint directory, or the original's name) and compress seconds."""
    if variant.startswith("fp32"):
        return model, 0.0
    out = KEEP / model / variant.replace(":", "-")
    t0 = time.perf_counter()
    if variant == "edge":
        recipe = out.parent / "edge.yaml"
        edge = Path(__file__).parents[1] / "src" / "tinyllm" / "recipes" / "edge.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(edge.read_text().replace("model: smollm2-135m", f"model: {model}"))
        again = "--resume" if (out / "state.json").is_file() else "--overwrite"  # keep done stages
        subprocess.run([*CLI, "run", str(recipe), "-o", str(out), again], check=True)
        last = sorted((out / "stages").iterdir())[-1]  # a training stage keeps it in model/
        model = last / "model" if (last / "model").is_dir() else last
        return str(model), time.perf_counter() - t0
    cmd = [*CLI, VARIANTS[variant][0], model, *VARIANTS[variant][1:], "-o", str(out)]
    subprocess.run([*cmd, "--overwrite"], check=True)
    return str(out), time.perf_counter() - t0


def score_gguf(model: str, limit: int | None) -> dict:
    """The edge row's GGUF through llama.cpp (export.scoring, as the recipe runner scores its
    exports): perplexity, KLD and top-1 on the rows' windows, and the same task questions."""
    from tinyllm.core.load import load
    from tinyllm.eval.evaluate import evaluation_windows
    from tinyllm.eval.tasks import run_tasks
    from tinyllm.export.scoring import open_backend, score_windows

    path = KEEP / model / "edge" / "export" / "model-q4_0.gguf"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run the {model}/edge row first")
    ref, tok = load(model)
    lm = open_backend("gguf", path, tok)
    windows, _ = evaluation_windows(tok, "enwiki", 512, int(WINDOWS))
    result = {"model": str(path), "runtime": "llama.cpp", **score_windows(lm, windows, ref)}
    result["tasks"] = run_tasks(lm, TASKS, limit)
    params = sum(p.numel() for p in ref.parameters())
    result["size_bytes"] = path.stat().st_size
    result["bits_per_weight"] = 8 * path.stat().st_size / params  # the whole file, header included
    return {**result, "task_limit": limit}


def run_row(name: str, limit: int | None) -> dict:
    model, variant = name.split("/")
    if variant == "edge-gguf":
        return score_gguf(model, limit)
    target, seconds = compress(model, variant)
    limit = None if variant.endswith("-full") else limit
    extra = ["--task-limit", str(limit)] if limit else []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "r.json"
        cmd = [*CLI, "eval", target, "--reference", model, "--windows", WINDOWS]
        cmd += ["--tasks", ",".join(TASKS), *extra, "--json", str(res)]
        subprocess.run(cmd, check=True)
        result = json.loads(res.read_text())
    wall = time.perf_counter() - t0  # the whole `tinyllm eval` process, loading included
    return {**result, "compress_seconds": seconds, "task_limit": limit, "eval_wall_seconds": wall}


def _cell(t: dict | None) -> str:
    return "-" if t is None else f"{100 * t['accuracy']:.1f} ± {100 * t['stderr']:.1f}"


def table(results: dict) -> str:
    lines = table_head(
        "model | row | " + " | ".join(TASKS) + " | mean task acc | ppl | KLD | top-1 | bits/w"
    )
    for name, r in rows_present(results, ROWS):
        if name.endswith("-full"):
            continue  # every question: a different sample from the other rows
        tasks = r.get("tasks") or {}
        mean = sum(t["accuracy"] for t in tasks.values()) / max(1, len(tasks))
        kld = "-" if r["kld"] is None else f"{r['kld']:.4f}"
        top1 = "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}"
        cells = " | ".join(_cell(tasks.get(t)) for t in TASKS)
        model, variant = name.split("/")
        lines.append(
            f"| {model} | {variant} | {cells} | {100 * mean:.1f} | {r['perplexity']:.2f} | {kld} "
            f"| {top1} | {r['bits_per_weight']:.2f} |"
        )
    return "\n".join(lines)


def _mean(r: dict) -> tuple[float, float]:
    """Mean accuracy over the row's tasks and its standard error (tasks independent)."""
    ts = list(r["tasks"].values())
    return (
        sum(t["accuracy"] for t in ts) / len(ts),
        sum(t["stderr"] ** 2 for t in ts) ** 0.5 / len(ts),
    )


def disagreements(results: dict) -> str:
    """Pairs of compressed rows of one model that KLD and mean task accuracy order differently,
    with the accuracy difference in standard errors (|diff| / se of the difference)."""
    lines = []
    for model in MODELS:
        rows = [
            (v, r)
            for v in VARIANTS
            if not v.startswith("fp32") and (r := results.get(f"{model}/{v}")) is not None
        ]
        for i, (a, ra) in enumerate(rows):
            for b, rb in rows[i + 1 :]:
                (ma, sa), (mb, sb) = _mean(ra), _mean(rb)
                if (ra["kld"] - rb["kld"]) * (ma - mb) > 0:  # lower KLD but lower accuracy
                    z = abs(ma - mb) / (sa**2 + sb**2) ** 0.5
                    lines.append(
                        f"- {model}: {a} (KLD {ra['kld']:.3f}, {100 * ma:.1f}%) vs {b} "
                        f"(KLD {rb['kld']:.3f}, {100 * mb:.1f}%): {z:.1f} standard errors"
                    )
    return "\n".join(lines) or "- none"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    args = row_args(ROWS, ap)
    run_rows(OUT, args, lambda name: run_row(name, args.limit), table)
    if args.table:
        print(
            "\nKLD and mean task accuracy disagree:\n" + disagreements(json.loads(OUT.read_text()))
        )


if __name__ == "__main__":
    main()
