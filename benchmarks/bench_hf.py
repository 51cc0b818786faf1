"""Issue 4 Hugging Face rows: tinyllm checkpoints exported with `--format hf` and loaded back by
transformers (+ compressed-tensors), scored beside tinyllm on the default 40 x 512 windows.

Run: .venv/bin/python benchmarks/bench_hf.py
Uses the bench_quant.py checkpoints in benchmarks/work/quant (symmetric 4-bit g32 GPTQ, and
asymmetric 4-bit g64 AWQ+GPTQ when present). Results: benchmarks/results/hf_smollm2.json.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM

import tinyllm
from tinyllm.export import export
from tinyllm.util.fs import dir_size

ROOT = Path(__file__).parent
OUT = ROOT / "results" / "hf_smollm2.json"
ROWS = ["gptq-4b-g32-sym", "awq-gptq-4b-g64"]


def main() -> None:
    results = {}
    for row in ROWS:
        ckpt = ROOT / "work" / "quant" / row
        if not (ckpt / "tinyllm.json").exists():
            print(f"skip {row}: run bench_quant.py --rows {row} first")
            continue
        model, tok = tinyllm.load(ckpt)
        ours = tinyllm.evaluate(model, tok).perplexity
        with tempfile.TemporaryDirectory() as tmp:
            report = export(model, tok, Path(tmp) / "hf", "hf")
            back = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").eval()
            theirs = tinyllm.evaluate(back, tok).perplexity
            size = dir_size(Path(tmp) / "hf")
        results[row] = {
            "packed_layers": len(report["packed"]),
            "tinyllm_perplexity": ours,
            "transformers_perplexity": theirs,
            "ratio": theirs / ours,
            "directory_bytes": size,
        }
        print(row, results[row], flush=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
