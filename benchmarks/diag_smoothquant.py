"""Where SmoothQuant-static's error comes from on smollm2-135m: a quick in-process diagnosis.

Run: .venv/bin/python benchmarks/diag_smoothquant.py
Quantizes copies of the FP32 model (32 calibration windows x 512, seed 0) and scores perplexity
on the first 10 evaluation windows (not the 40-window protocol: cheaper, for ratios only):
SmoothQuant static per-tensor as shipped, the same with every down_proj put back in float after
quantization, with the MSE observer, and with per-channel static ranges.
"""

from __future__ import annotations

import copy

import tinyllm
from tinyllm.data.calibration import calibration_windows
from tinyllm.eval.evaluate import evaluate
from tinyllm.kernels.qlinear import set_module
from tinyllm.quant.api import quantize
from tinyllm.quant.smoothquant import SmoothQuant

WINDOWS = 10
RUNS = {
    "sq-static": (SmoothQuant(), ()),
    "sq-static, down_proj float": (SmoothQuant(), ("down_proj",)),
    "sq-static, mse observer": (SmoothQuant(observer="mse"), ()),
    "sq-static, per-channel": (SmoothQuant(granularity="channel"), ()),
}


def main() -> None:
    base, tok = tinyllm.load("smollm2-135m")
    calib = calibration_windows(tok, "enwiki", 32, 512, 0)
    fp = evaluate(base, tok, windows=WINDOWS).perplexity
    print(
        f"| run | perplexity ({WINDOWS} windows) | x FP32 |\n|---|---|---|\n| fp32 | {fp:.3f} | 1 |"
    )
    for name, (cfg, keep_float) in RUNS.items():
        model = copy.deepcopy(base)
        floats = {n: m for n, m in model.named_modules() if keep_float and n.endswith(keep_float)}
        quantize(model, cfg, calib=calib)
        for n, m in floats.items():  # put the float layers back (their inputs saw W8A8 upstream)
            set_module(model, n, m)
        ppl = evaluate(model, tok, windows=WINDOWS).perplexity
        print(f"| {name} | {ppl:.3f} | {ppl / fp:.4f} |", flush=True)
        del model


if __name__ == "__main__":
    main()
