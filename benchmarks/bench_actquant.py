"""Issue 9 table: activation quantization (W8A8, SmoothQuant, FP8) of smollm2-135m, plus prefill.

Run: .venv/bin/python benchmarks/bench_actquant.py [--rows NAME,...] [--table]
Accuracy rows run `tinyllm quantize` (checkpoint kept in benchmarks/work/actquant/ROW) then
`tinyllm eval DIR --reference smollm2-135m --json`. The `prefill` row times one 512-token forward
of the FP32 model (plain, and with tinyllm's oneDNN-packed fp32 linears) and of the int8-dynamic
and SmoothQuant-static models in one process: medians over repeats, ratios to FP32.
Results merge into benchmarks/results/actquant_smollm2.json row by row (resumable).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rowtable import cli_eval, row_args, run_rows

OUT = Path(__file__).parent / "results" / "actquant_smollm2.json"
KEEP = Path(__file__).parent / "work" / "actquant"
CLI = [sys.executable, "-m", "tinyllm.cli"]
ROWS: dict[str, list[str]] = {
    "fp32": [],
    "w8a8-static-tensor-minmax": ["--method", "int8-static"],
    "w8a8-static-tensor-pct": ["--method", "int8-static", "--observer", "percentile"],
    "w8a8-static-tensor-mse": ["--method", "int8-static", "--observer", "mse"],
    "w8a8-static-channel-minmax": ["--method", "int8-static", "--granularity", "channel"],
    "w8a8-dynamic-token": ["--method", "int8-dynamic"],
    "smoothquant-static-layer": ["--method", "smoothquant"],
    "smoothquant-static-model": ["--method", "smoothquant", "--alpha-search", "model"],
    "smoothquant-static-0.5": ["--method", "smoothquant", "--alpha", "0.5"],
    "smoothquant-static-mse": ["--method", "smoothquant", "--observer", "mse"],
    "smoothquant-dynamic-layer": ["--method", "smoothquant", "--activations", "dynamic"],
    "fp8-e4m3-dynamic": ["--method", "fp8"],
    "fp8-e5m2-dynamic": ["--method", "fp8", "--fp8-format", "e5m2"],
    "fp8-e4m3-static": ["--method", "fp8", "--activations", "static"],
    "prefill": [],
}


def run_row(name: str, flags: list[str]) -> dict:
    if name == "prefill":
        return prefill_speed()
    target, meta, report = "smollm2-135m", {}, {}
    if flags:
        out = KEEP / name
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([*CLI, "quantize", "smollm2-135m", *flags, "-o", str(out)], check=True)
        meta = json.loads((out / "tinyllm.json").read_text())
        report = json.loads((out / "quant_report.json").read_text())
        target = str(out)
    result = cli_eval(target)
    return {
        "command": " ".join(["tinyllm quantize smollm2-135m", *flags]) if flags else "fp32",
        "eval": result,
        "quant_seconds": meta.get("seconds"),
        "quant_peak_rss_bytes": meta.get("peak_rss_bytes"),
        "activations": report.get("activations"),
        "simulated": report.get("simulated"),
        "alpha": report.get("smoothquant_model_alpha"),
    }


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def prefill_speed(tokens: int = 512, repeats: int = 9) -> dict:
    """One forward over `tokens` tokens, FP32 vs W8A8 models, in this process."""
    import torch

    import tinyllm
    from tinyllm.core.kernels import fast_linears

    ids = torch.randint(0, 49152, (1, tokens), generator=torch.Generator().manual_seed(0))
    out: dict = {"tokens": tokens, "repeats": repeats, "threads": torch.get_num_threads()}

    def forward(model):
        return lambda: model(input_ids=ids, use_cache=False)

    with torch.no_grad():
        fp32, _ = tinyllm.load("smollm2-135m")
        out["fp32_ms"] = _median_ms(forward(fp32), repeats)
        with fast_linears(fp32, tokens):
            out["fp32_onednn_ms"] = _median_ms(forward(fp32), repeats)
        del fp32
        for row in ("w8a8-dynamic-token", "smoothquant-static-layer"):
            if (KEEP / row).is_dir():
                model, _ = tinyllm.load(KEEP / row)
                out[f"{row}_ms"] = _median_ms(forward(model), repeats)
                with fast_linears(model, tokens):  # the float head on oneDNN too
                    out[f"{row}_onednn_ms"] = _median_ms(forward(model), repeats)
                del model
    return out


def table(results: dict) -> str:
    fp = results["fp32"]["eval"]["perplexity"]
    lines = [
        "| row | activations | perplexity | x FP32 | KLD | top-1 | bits/w | quant s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ROWS:
        if name not in results or name == "prefill":
            continue
        r, e = results[name], results[name]["eval"]
        acts = r.get("activations") or "float"
        if r.get("simulated"):
            acts += " (simulated)"
        if r.get("alpha") is not None:
            acts += f", alpha {r['alpha']:.1f}"
        qs = f"{r['quant_seconds']:.1f}" if r.get("quant_seconds") is not None else "-"
        lines.append(
            f"| {name} | {acts} | {e['perplexity']:.3f} | {e['perplexity'] / fp:.4f} | "
            f"{e['kld']:.4f} | {e['top1_agreement']:.4f} | {e['bits_per_weight']:.2f} | {qs} |"
        )
    if "prefill" in results:
        p = results["prefill"]
        lines += ["", f"Prefill, one {p['tokens']}-token forward, median of {p['repeats']}:", ""]
        lines += ["| model | float layers | ms | FP32 / model | FP32 oneDNN / model |"]
        lines += ["|---|---|---|---|---|"]
        for key in ("fp32", "w8a8-dynamic-token", "smoothquant-static-layer"):
            for sub, where in (("", "PyTorch"), ("_onednn", "oneDNN-packed")):
                if f"{key}{sub}_ms" in p:
                    ms = p[f"{key}{sub}_ms"]
                    lines.append(
                        f"| {key} | {where} | {ms:.1f} | {p['fp32_ms'] / ms:.2f}x | "
                        f"{p['fp32_onednn_ms'] / ms:.2f}x |"
                    )
    return "\n".join(lines)


def main() -> None:
    args = row_args(list(ROWS), argparse.ArgumentParser())
    run_rows(OUT, args, lambda name: run_row(name, ROWS[name]), table)


if __name__ == "__main__":
    main()
