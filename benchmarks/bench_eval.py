"""Issue 2 numbers: the default evaluation of smollm2-135m, its time, and the self-reference check.

Run: .venv/bin/python benchmarks/bench_eval.py [--repeats 3]
Writes benchmarks/results/eval_smollm2.json. Times are medians over repeats; the oneDNN path is
compared with the plain PyTorch path in the same run (a ratio), since this machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import tinyllm
from provenance import write_result
from tinyllm.models.load import load

OUT = Path(__file__).parent / "results" / "eval_smollm2.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, tok = load("smollm2-135m")  # first load in this process: includes transformers imports
    first_load = time.perf_counter() - t0
    loads = []
    for _ in range(3):
        t0 = time.perf_counter()
        load("smollm2-135m")
        loads.append(time.perf_counter() - t0)
    runs: dict[str, list] = {"fast": [], "plain": []}
    for _ in range(args.repeats):
        for mode in ("fast", "plain"):
            r = tinyllm.evaluate(model, tok, fast=mode == "fast")
            runs[mode].append(r)
    ref = tinyllm.evaluate(model, tok, reference=(model, tok))
    med = {m: statistics.median(r.eval_seconds for r in rs) for m, rs in runs.items()}
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "perplexity": runs["fast"][0].perplexity,
        "perplexity_plain_path": runs["plain"][0].perplexity,
        "tokens": runs["fast"][0].tokens,
        "first_load_seconds_in_process": first_load,
        "cached_load_seconds_median": statistics.median(loads),
        "eval_seconds_median": med,
        "eval_seconds_all": {m: [r.eval_seconds for r in rs] for m, rs in runs.items()},
        "plain_over_fast_ratio": med["plain"] / med["fast"],
        "load_plus_eval_seconds": first_load + med["fast"],
        "tokens_per_second_fast": statistics.median(r.tokens_per_second for r in runs["fast"]),
        "peak_rss_bytes": runs["fast"][-1].peak_rss_bytes,
        "self_reference": {
            "kld": ref.kld,
            "top1_agreement": ref.top1_agreement,
            "perplexity": ref.perplexity,
        },
    }
    write_result(OUT, result)


if __name__ == "__main__":
    main()
