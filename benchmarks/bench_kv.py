"""The KV cache's precision through the tinyllm runtime: perplexity and KL divergence of
smollm2-135m (FP32 weights, so only the cache rounds) with a float32, float16 and int8 pool
(`--kv-dtype`), and the pool's bytes per token.

Run: .venv/bin/python benchmarks/bench_kv.py [--windows 16]
Each pool scores the evaluation windows (enwiki, 512 tokens) through `runtime.lm.RuntimeLM`:
every window is one prefill whose keys and values go through the pool before attention reads
them, so each position attends to cached (rounded) keys and values as decoding does. KLD and
top-1 against the FP32 model's transformers forward. Writes benchmarks/results/kv_smollm2.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import tinyllm
from provenance import write_result
from tinyllm.eval.evaluate import evaluation_windows
from tinyllm.export.scoring import score_windows
from tinyllm.runtime.engine import KV_DTYPES
from tinyllm.runtime.lm import RuntimeLM

OUT = Path(__file__).parent / "results" / "kv_smollm2.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    model, tok = tinyllm.load("smollm2-135m")
    windows, corpus = evaluation_windows(tok, "enwiki", 512, args.windows)
    rows = {}
    for name in ("float32", "float16", "int8"):
        lm = RuntimeLM(model, tok, f"kv-{name}", kv_dtype=KV_DTYPES[name])
        scores = score_windows(lm, windows, model)
        shape = lm.runtime.cache_shape(KV_DTYPES[name])
        rows[name] = {**scores, "bytes_per_token": shape.bytes_per_token()}
        print(name, {k: rows[name][k] for k in ("perplexity", "kld", "bytes_per_token")})
    base = rows["float16"]
    for row in rows.values():
        row["ppl_vs_float16"] = row["perplexity"] / base["perplexity"]
        row["bytes_vs_float16"] = row["bytes_per_token"] / base["bytes_per_token"]
    result = {
        "command": f"benchmarks/bench_kv.py --windows {args.windows}",
        "corpus": corpus,
        "windows": args.windows,
        "rows": rows,
        "torch": torch.__version__,
    }
    write_result(OUT, result)


if __name__ == "__main__":
    main()
