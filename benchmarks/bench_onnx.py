"""Issue 4 ONNX rows: smollm2-135m exported to ONNX and run by onnxruntime, beside tinyllm.

Run: .venv/bin/python benchmarks/bench_onnx.py [ROW ...]   (rows merge into the results file)
Rows: fp32 (the float model), q4 (the GPTQ 4-bit g32 symmetric checkpoint that
benchmarks/bench_quant.py keeps in benchmarks/work/quant/gptq-4b-g32-sym, else RTN with the same
grid) as MatMulNBits, q8 (RTN 8-bit g32 symmetric) as MatMulNBits, w8a8 (the SmoothQuant
static checkpoint benchmarks/bench_actquant.py keeps, else int8-dynamic) as QuantizeLinear +
MatMulInteger. Columns: perplexity from
onnxruntime's logits on the 40 x 512 evaluation windows and from `tinyllm eval` of the same model,
and greedy decode speed (64 new tokens after a 32-token prompt, median of 3) of onnxruntime (KV
cache through the graph's inputs/outputs) and of the tinyllm/transformers model (generate with its
cache), measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tinyllm
from tinyllm.eval.evaluate import evaluation_windows
from tinyllm.export import export, onnxrt

ROOT = Path(__file__).parent
OUT = ROOT / "results" / "onnx_smollm2.json"
GPTQ_DIR = ROOT / "work" / "quant" / "gptq-4b-g32-sym"
SQ_DIR = ROOT / "work" / "actquant" / "smoothquant-static-layer"
NEW, REPEATS = 64, 3


def model_for(row: str):
    if row == "q4" and (GPTQ_DIR / "tinyllm.json").exists():
        return (*tinyllm.load(GPTQ_DIR), "GPTQ 4-bit g32 sym (bench_quant checkpoint)")
    if row == "w8a8" and (SQ_DIR / "tinyllm.json").exists():
        return (*tinyllm.load(SQ_DIR), "SmoothQuant W8A8 static (bench_actquant checkpoint)")
    model, tok = tinyllm.load("smollm2-135m")
    if row == "w8a8":
        from tinyllm.quant.int8 import Int8Dynamic

        tinyllm.quantize(model, Int8Dynamic())
        return model, tok, "INT8 dynamic W8A8"
    if row == "fp32":
        return model, tok, "float"
    bits = 4 if row == "q4" else 8
    tinyllm.quantize(model, tinyllm.RTN(bits=bits, group_size=32, sym=True, mse=True))
    return model, tok, f"RTN {bits}-bit g32 sym"


def decode_speed(fn) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return NEW / statistics.median(times)


def run_row(row: str) -> dict:
    model, tok, what = model_for(row)
    windows, _ = evaluation_windows(tok)
    ours_ppl = tinyllm.evaluate(model, tok).perplexity
    prompt = windows[0, :32].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export(model, tok, path, "onnx", row)
        size = path.stat().st_size + path.with_name("m.onnx.data").stat().st_size
        sess = onnxrt.open_onnx(path)
        ort_ppl = onnxrt.perplexity(sess, windows)
        ort_tps = decode_speed(lambda: onnxrt.greedy(sess, prompt, NEW))

    def ours() -> None:
        with torch.no_grad():
            model.generate(
                torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False
            )

    ours_tps = decode_speed(ours)
    return {
        "model": what,
        "onnx_bytes": size,
        "ort_perplexity": ort_ppl,
        "tinyllm_perplexity": ours_ppl,
        "ort_decode_tokens_per_s": ort_tps,
        "tinyllm_decode_tokens_per_s": ours_tps,
    }


def table(results: dict) -> str:
    lines = [
        "| row | model | ONNX size | ppl onnxruntime | ppl tinyllm | ratio | decode tok/s ORT "
        "| decode tok/s tinyllm | ORT / tinyllm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in results.items():
        lines.append(
            f"| {row} | {r['model']} | {r['onnx_bytes'] / 2**20:.1f} MiB | "
            f"{r['ort_perplexity']:.3f} | {r['tinyllm_perplexity']:.3f} | "
            f"{r['ort_perplexity'] / r['tinyllm_perplexity']:.4f} | "
            f"{r['ort_decode_tokens_per_s']:.1f} | {r['tinyllm_decode_tokens_per_s']:.1f} | "
            f"{r['ort_decode_tokens_per_s'] / r['tinyllm_decode_tokens_per_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    import sys

    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for row in sys.argv[1:] or ("fp32", "q4", "q8", "w8a8"):
        print(f"== {row}", flush=True)
        results[row] = run_row(row)
        OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
