"""Issue 6 table: pruning smollm2-135m, each row through the CLI in its own process.

Run: .venv/bin/python benchmarks/bench_prune.py [--rows NAME,...] [--force] [--table]
Each row runs `tinyllm prune` (output kept in benchmarks/work/prune/ROW, git-ignored) then
`tinyllm eval DIR --reference smollm2-135m --json`. Structured rows also get prefill (one
512-token forward) and decode (one token after a 64-token prompt in the KV cache) times against
the FP32 model, interleaved in one process (medians of --repeats; prefill both with logits for
all 512 positions, as perplexity needs, and with the last position's only, as serving does);
their `+kd` / `+ce` rows recover them for RECOVERY_STEPS steps of distillation (KD + task) or of
plain cross-entropy fine-tuning, the same data and steps (SparseGPT rows get a `+kd` row too,
masks fixed). Results merge into benchmarks/results/prune_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rowtable import row_args, rows_present, run_rows, table_head

HERE = Path(__file__).parent
OUT = HERE / "results" / "prune_smollm2.json"
WORK = HERE / "work" / "prune"
CLI = [sys.executable, "-m", "tinyllm.cli"]
RECOVERY_STEPS = 60  # KD + task at ~110 student tok/s: about 10 minutes of training
UNSTRUCTURED = {
    "dense-fp16": ["--method", "magnitude", "--sparsity", "0"],  # the size reference
    "magnitude-50": ["--method", "magnitude", "--sparsity", "0.5"],
    "wanda-50": ["--method", "wanda", "--sparsity", "0.5"],
    "sparsegpt-50": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "magnitude-2:4": ["--method", "magnitude", "--pattern", "2:4"],
    "wanda-2:4": ["--method", "wanda", "--pattern", "2:4"],
    "sparsegpt-2:4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "magnitude-30": ["--method", "magnitude", "--sparsity", "0.3"],
    "wanda-30": ["--method", "wanda", "--sparsity", "0.3"],
    "sparsegpt-30": ["--method", "sparsegpt", "--sparsity", "0.3"],
    "magnitude-50-owl": ["--method", "magnitude", "--sparsity", "0.5", "--allocation", "owl"],
    "wanda-50-owl": ["--method", "wanda", "--sparsity", "0.5", "--allocation", "owl"],
    "sparsegpt-50-owl": ["--method", "sparsegpt", "--sparsity", "0.5", "--allocation", "owl"],
    # bf16 calibration passes (session 19: bf16 Hessians with the 32 largest channels exact)
    "sparsegpt-50-bf16": [
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
        "--calib-dtype",
        "bfloat16",
    ],
    "wanda-50-bf16": ["--method", "wanda", "--sparsity", "0.5", "--calib-dtype", "bfloat16"],
}
STRUCTURED = {
    "channels-25": ["--method", "channels", "--sparsity", "0.25"],
    "kv-groups-1of3": ["--method", "heads", "--count", "1"],
    "blocks-4": ["--method", "blocks", "--count", "4"],
    # the same cuts scored by the first-order Taylor term (no recovery rows)
    "channels-25-taylor": [
        "--method",
        "channels",
        "--sparsity",
        "0.25",
        "--importance",
        "gradient",
        "--samples",
        "32",
    ],
    "kv-groups-1of3-taylor": [
        "--method",
        "heads",
        "--count",
        "1",
        "--importance",
        "gradient",
        "--samples",
        "32",
    ],
}
RECOVERED = ("channels-25", "kv-groups-1of3", "blocks-4")
# unstructured rows recovered with KD + task (masks fixed): how far the same 10 minutes take them
RECOVERED_SPARSE = ("sparsegpt-50", "sparsegpt-2:4")
RECOVERY = {"kd": ["--beta", "1"], "ce": ["--alpha", "0", "--beta", "1"]}
ROWS = [
    "fp32",
    *UNSTRUCTURED,
    *(f"{n}+kd" for n in RECOVERED_SPARSE),
    *(f"{n}{s}" for n in STRUCTURED for s in ("", "+kd", "+ce") if not s or n in RECOVERED),
]


def evaluate(target: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "r.json"
        cmd = [*CLI, "eval", str(target), "--reference", "smollm2-135m", "--json", str(res)]
        subprocess.run(cmd, check=True)
        return json.loads(res.read_text())


def speed(target: Path, repeats: int) -> dict:
    """Prefill and decode medians of the pruned model against FP32, interleaved."""
    import torch
    from transformers import DynamicCache

    import tinyllm
    from tinyllm.core.kernels import fast_linears

    models = {"fp32": tinyllm.load("smollm2-135m")[0], "pruned": tinyllm.load(target)[0]}
    prompt, long = torch.randint(0, 49152, (1, 64)), torch.randint(0, 49152, (1, 512))
    token = torch.randint(0, 49152, (1, 1))
    kinds = ("prefill", "prefill_last", "decode")
    times: dict[str, list[float]] = {f"{n}-{k}": [] for n in models for k in kinds}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, model in models.items():
                with fast_linears(model, 512):
                    t0 = time.perf_counter()
                    model(input_ids=long, use_cache=False)
                    times[f"{name}-prefill"].append(time.perf_counter() - t0)
                    # serving prefill: the prompt's keys/values and only the last token's logits
                    t0 = time.perf_counter()
                    model(input_ids=long, use_cache=False, logits_to_keep=1)
                    times[f"{name}-prefill_last"].append(time.perf_counter() - t0)
                cache = DynamicCache()
                model(input_ids=prompt, past_key_values=cache, use_cache=True)
                t0 = time.perf_counter()
                model(input_ids=token, past_key_values=cache, use_cache=True)
                times[f"{name}-decode"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "prefill_speedup": med["fp32-prefill"] / med["pruned-prefill"],
        "prefill_last_speedup": med["fp32-prefill_last"] / med["pruned-prefill_last"],
        "decode_speedup": med["fp32-decode"] / med["pruned-decode"],
        "repeats": repeats,
    }


def run_row(name: str, repeats: int) -> dict:
    if name == "fp32":  # the dense reference
        return {"eval": evaluate(Path("smollm2-135m")), "weights_bytes_on_disk": None}
    base, _, recover = name.partition("+")
    row: dict = {}
    if recover:
        source = WORK / base
        out = WORK / name
        flags = ["--student", str(source), "--steps", str(RECOVERY_STEPS), *RECOVERY[recover]]
        flags += [
            "--eval-every",
            "0",
            "--final-eval-windows",
            "8",
            "--batch",
            "4",
            "--seq-len",
            "256",
        ]
        t0 = time.perf_counter()
        subprocess.run([*CLI, "distill", *flags, "-o", str(out), "--overwrite"], check=True)
        summary = json.loads((out / "summary.json").read_text())
        row["train_seconds"] = summary["train_seconds"]
        row["wall"] = time.perf_counter() - t0
        row["command"] = " ".join(["tinyllm distill", *flags])
        target = out / "model"
    else:
        flags = {**UNSTRUCTURED, **STRUCTURED}[name]
        target = WORK / name
        cmd = [*CLI, "prune", "smollm2-135m", *flags, "-o", str(target), "--overwrite"]
        subprocess.run(cmd, check=True)
        meta = json.loads((target / "tinyllm.json").read_text())
        row.update(prune_seconds=meta["seconds"], prune_peak_rss_bytes=meta["peak_rss_bytes"])
        row["command"] = " ".join(["tinyllm prune smollm2-135m", *flags])
    row["eval"] = evaluate(target)
    row["weights_bytes_on_disk"] = (target / "model.safetensors").stat().st_size
    if base in STRUCTURED:
        row["speed"] = speed(target, repeats)
    return row


def table(results: dict) -> str:
    if "fp32" not in results:
        return "(no fp32 row yet)"
    fp = results["fp32"]["eval"]["perplexity"]
    lines = table_head(
        "row | ppl | x FP32 | KLD | sparsity | params | weights on disk | prune s | peak RSS "
        "| prefill x | prefill x (last logits) | decode x"
    )
    for name, r in rows_present(results, ROWS):
        e = r["eval"]
        sp = r.get("speed", {})
        cells = [
            name,
            f"{e['perplexity']:.3f}",
            f"{e['perplexity'] / fp:.3f}",
            f"{e['kld']:.4f}" if e["kld"] is not None else "-",
            f"{e['sparsity']:.1%}",
            f"{e['params'] / 1e6:.1f} M",
            f"{r['weights_bytes_on_disk'] / 2**20:.1f} MiB" if r["weights_bytes_on_disk"] else "-",
            f"{r['prune_seconds']:.1f}" if "prune_seconds" in r else "-",
            f"{r['prune_peak_rss_bytes'] / 1e9:.2f} GB" if "prune_peak_rss_bytes" in r else "-",
            f"{sp['prefill_speedup']:.2f}" if sp else "-",
            f"{sp['prefill_last_speedup']:.2f}" if "prefill_last_speedup" in sp else "-",
            f"{sp['decode_speedup']:.2f}" if sp else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument(
        "--speed-only",
        action="store_true",
        help="re-measure only the prefill/decode speed of finished structured rows (on a quiet "
        "machine: concurrent jobs on 2 cores make every thread spin-wait)",
    )
    args = row_args(ROWS, ap)
    if args.speed_only:
        remeasure_speed(args.rows.split(","), args.repeats)
        return
    run_rows(OUT, args, lambda name: run_row(name, args.repeats), table)


def remeasure_speed(rows: list[str], repeats: int) -> None:
    results = json.loads(OUT.read_text())
    for name in rows:
        base, _, recover = name.partition("+")
        if name not in results or base not in STRUCTURED:
            continue
        target = WORK / name / "model" if recover else WORK / name
        print(f"== speed {name}", flush=True)
        results[name]["speed"] = speed(target, repeats)
        tmp = OUT.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(OUT)
    print(table(results))


if __name__ == "__main__":
    main()
