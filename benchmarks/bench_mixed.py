"""Mixed precision on smollm2-135m: per-layer widths from measured sensitivity vs uniform grids.

Run: .venv/bin/python benchmarks/bench_mixed.py [--rows NAME,...] [--samples 128] [--force]
[--table].
Each row loads smollm2-135m, quantizes it in this process on one thread with `--samples`
calibration windows of 512 tokens (the CLI defaults), saves the checkpoint in
benchmarks/work/mixed/ROW (git-ignored) and scores it with `tinyllm.evaluate` against the FP32
model: the `tinyllm eval --reference smollm2-135m` protocol (40 windows of 512 tokens of the enwiki
evaluation slice; perplexity, mean KL(FP32 || model), top-1 agreement). As `tinyllm quantize`
does by default, the tensors left in float (embeddings, norms) are rounded to float16 before
scoring and stored so. Every grid has groups of
64, asymmetric (never 4-bit groups of 32 asymmetric on this model: its weights sit on that grid).
Results merge into benchmarks/results/mixed_smollm2.json row by row, so an interrupted run
resumes; `--table` prints the Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

import tinyllm
from rowtable import row_args, rows_present, run_rows, table_head
from tinyllm.checkpoint import round_floats
from tinyllm.core.steps import Step
from tinyllm.kernels.qlinear import QuantLinear
from tinyllm.quant.gptq import GPTQ
from tinyllm.quant.mixed import Mixed
from tinyllm.quant.rtn import RTN

HERE = Path(__file__).parent
OUT = HERE / "results" / "mixed_smollm2.json"
WORK = HERE / "work" / "mixed"
MODEL = "smollm2-135m"
MIXED_BITS = [3, 4, 8]
ROWS: dict[str, Step | None] = {
    "fp32": None,
    "rtn-3b-g64": RTN(bits=3, group_size=64),
    "rtn-4b-g64": RTN(bits=4, group_size=64),
    "mixed-rtn-3.5b-g64": Mixed(base=RTN(bits=4, group_size=64), bits=MIXED_BITS, avg_bits=3.5),
    "gptq-3b-g64": GPTQ(bits=3, group_size=64, weighted_grid=False),
    "gptq-4b-g64": GPTQ(bits=4, group_size=64, weighted_grid=False),
    "mixed-gptq-3.5b-g64": Mixed(
        base=GPTQ(bits=4, group_size=64, weighted_grid=False), bits=MIXED_BITS, avg_bits=3.5
    ),
    # ablations: widths 3 and 4 only; sensitivities on 4x more windows
    "mixed-rtn-3.5b-g64-w34": Mixed(base=RTN(bits=4, group_size=64), bits=[3, 4], avg_bits=3.5),
    "mixed-rtn-3.5b-g64-s8": Mixed(
        base=RTN(bits=4, group_size=64), bits=MIXED_BITS, avg_bits=3.5, sensitivity_samples=8
    ),
    # block-local sensitivities (--sensitivity block: what a streamed model measures)
    "mixed-rtn-3.5b-g64-block": Mixed(
        base=RTN(bits=4, group_size=64), bits=MIXED_BITS, avg_bits=3.5, sensitivity="block"
    ),
    "mixed-gptq-3.5b-g64-block": Mixed(
        base=GPTQ(bits=4, group_size=64, weighted_grid=False),
        bits=MIXED_BITS,
        avg_bits=3.5,
        sensitivity="block",
    ),
}
_reference: tuple | None = None


def reference() -> tuple:
    global _reference
    if _reference is None:
        _reference = tinyllm.load(MODEL)
    return _reference


def linear_facts(model: torch.nn.Module) -> dict:
    """Mean code width (parameter-weighted) and storage of the quantized block linears."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    params = sum(m.qweight.shape[0] * m.qweight.shape[1] for m in layers)
    codes = sum(m.qweight.shape[0] * m.qweight.shape[1] * m.qweight.bits for m in layers)
    stored = sum(m.qweight.storage_bits() for m in layers)
    return {"avg_bits": codes / params, "linear_mib": stored / 8 / 2**20}


def allocation_summary(alloc: dict[str, int]) -> dict:
    """Layers per width, and per role (the last part of the layer name)."""
    by_role: dict[str, Counter] = {}
    for name, bits in alloc.items():
        by_role.setdefault(name.rsplit(".", 1)[-1], Counter())[bits] += 1
    return {
        "layers_per_width": dict(Counter(alloc.values())),
        "per_role": {role: dict(c) for role, c in by_role.items()},
    }


def run_row(name: str, samples: int) -> dict:
    cfg = ROWS[name]
    model, tok = tinyllm.load(MODEL)
    row: dict = {"config": cfg.describe() if cfg else "fp32", "samples": samples if cfg else None}
    if cfg is not None:
        calib = tinyllm.calibration_windows(tok, samples=samples, seq_len=512)
        t0 = time.perf_counter()
        report = tinyllm.quantize(model, cfg, calib=calib)
        row["quant_seconds"] = time.perf_counter() - t0
        round_floats(model, torch.float16)  # as `tinyllm quantize` (--float-dtype float16)
        row.update(linear_facts(model))
        if "bit_allocation" in report:
            row["sensitivity_seconds"] = report["sensitivity_seconds"]
            row["allocation"] = allocation_summary(report["bit_allocation"])
            row["bit_allocation"] = report["bit_allocation"]
            row["sensitivity"] = report["sensitivity"]
        out = WORK / name
        shutil.rmtree(out, ignore_errors=True)
        tinyllm.save_checkpoint(model, tok, out, {"steps": [cfg.describe()]})
        row["weights_bytes_on_disk"] = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    ref = None if cfg is None else reference()
    row["eval"] = tinyllm.evaluate(model, tok, reference=ref, name=name).to_dict()
    return row


def table(results: dict) -> str:
    fp = results["fp32"]["eval"]["perplexity"] if "fp32" in results else None
    lines = table_head(
        "row | perplexity | x FP32 | KLD | top-1 | avg code bits "
        "| linear bits/w (with scales) | linears | weights on disk | quant s (sensitivity s)"
    )
    for name, r in rows_present(results, ROWS):
        e = r["eval"]
        ratio = f"{e['perplexity'] / fp:.3f}" if fp else "-"
        kld = f"{e['kld']:.4f}" if e["kld"] is not None else "-"
        top1 = f"{e['top1_agreement']:.4f}" if e["top1_agreement"] is not None else "-"
        avg = f"{r['avg_bits']:.3f}" if "avg_bits" in r else "32"
        lin = f"{r['linear_mib']:.1f} MiB" if "linear_mib" in r else "-"
        disk = r.get("weights_bytes_on_disk")
        disk = f"{disk / 2**20:.1f} MiB" if disk else "-"
        qs = f"{r['quant_seconds']:.0f}" if "quant_seconds" in r else "-"
        if "sensitivity_seconds" in r:
            qs += f" ({r['sensitivity_seconds']:.0f})"
        lines.append(
            f"| {name} | {e['perplexity']:.3f} | {ratio} | {kld} | {top1} | {avg} | "
            f"{e['bits_per_weight']:.3f} | {lin} | {disk} | {qs} |"
        )
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    args = row_args(list(ROWS), ap)
    run_rows(OUT, args, lambda name: run_row(name, args.samples), table)


if __name__ == "__main__":
    main()
