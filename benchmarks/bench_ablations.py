"""Small ablations quoted in BENCHMARKS.md (smollm2-135m, first 10 evaluation windows).

Run: .venv/bin/python benchmarks/bench_ablations.py [--only NAME,...]
- rtn-sym-mse / rtn-sym-nomse / rtn-asym-mse / rtn-asym-nomse: RTN 4-bit g32, MSE clipping on/off
- gptq-sym-mse / gptq-sym-nomse: GPTQ 4-bit g32 symmetric, 32 calibration windows
- awq-rtn-clip / awq-rtn-noclip: AWQ+RTN 4-bit g64 (MSE on), 32 calibration windows
Prints one perplexity per line; results in benchmarks/results/ablations_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tinyllm
from tinyllm.quant.awq import AWQ

OUT = Path(__file__).parent / "results" / "ablations_smollm2.json"
RUNS = {
    "rtn-sym-mse": lambda: tinyllm.RTN(bits=4, group_size=32, sym=True, mse=True),
    "rtn-sym-nomse": lambda: tinyllm.RTN(bits=4, group_size=32, sym=True, mse=False),
    "rtn-asym-mse": lambda: tinyllm.RTN(bits=4, group_size=32, mse=True),
    "rtn-asym-nomse": lambda: tinyllm.RTN(bits=4, group_size=32, mse=False),
    "gptq-sym-mse": lambda: tinyllm.GPTQ(
        bits=4, group_size=32, sym=True, mse=True, weighted_grid=False
    ),
    "gptq-sym-nomse": lambda: tinyllm.GPTQ(
        bits=4, group_size=32, sym=True, mse=False, weighted_grid=False
    ),
    "awq-rtn-clip": lambda: AWQ(base=tinyllm.RTN(bits=4, group_size=64, mse=True), clip=True),
    "awq-rtn-noclip": lambda: AWQ(base=tinyllm.RTN(bits=4, group_size=64, mse=True), clip=False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(RUNS))
    args = ap.parse_args()
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for name in args.only.split(","):
        model, tok = tinyllm.load("smollm2-135m")
        cfg = RUNS[name]()
        calib = (
            tinyllm.calibration_windows(tok, samples=32, seq_len=512) if cfg.calibrated else None
        )
        tinyllm.quantize(model, cfg, calib=calib)
        results[name] = tinyllm.evaluate(model, tok, windows=10).perplexity
        print(name, results[name], flush=True)
        OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
