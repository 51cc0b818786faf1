"""Where GPTQ's time goes: torch profiler over the first N blocks of smollm2-135m.

Run: .venv/bin/python benchmarks/prof_gptq_blocks.py [--blocks 3] [--calib-dtype bfloat16]

GPTQ 4-bit g64 (the defaults) with 128 x 512 calibration on a model cut to its first N blocks;
prints the wall seconds per block and the profiler's table of operators by self time.
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

import tinyllm
from tinyllm.core.steps import run_step
from tinyllm.data.calibration import calibration_windows
from tinyllm.quant.gptq import GPTQ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--calib-dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    model, tok = tinyllm.load("smollm2-135m")
    model.model.layers = model.model.layers[: args.blocks]
    model.config.num_hidden_layers = args.blocks
    calib = calibration_windows(tok, "enwiki", 128, 512, 0)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step(model, GPTQ(bits=4, group_size=64), calib, 8, args.calib_dtype)
    seconds = time.perf_counter() - t
    print(f"{seconds:.1f} s, {seconds / args.blocks:.2f} s per block ({args.calib_dtype})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
