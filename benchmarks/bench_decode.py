"""Decode speed: a 1-token forward of the 4-bit QuantLinear model against the FP32 model.

Rows: fp32, fp32 through oneDNN, 4-bit g64 with tinyllm's q4 kernel (the default), the same
model with PyTorch's int4 kernel, 8-bit per channel with PyTorch's int8 kernel.
Run: .venv/bin/python benchmarks/bench_decode.py [--repeats 50]
Both models run in this process, interleaved, each step a forward of one new token after a
64-token prompt held in the KV cache. Reports medians and the ratio; writes
benchmarks/results/decode_smollm2.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import tinyllm
from provenance import write_result
from tinyllm.core.kernels import fast_linears

OUT = Path(__file__).parent / "results" / "decode_smollm2.json"


@torch.inference_mode()
def step_time(model, prompt: torch.Tensor, token: torch.Tensor) -> float:
    cache = DynamicCache()
    model(input_ids=prompt, past_key_values=cache, use_cache=True)
    t0 = time.perf_counter()
    model(input_ids=token, past_key_values=cache, use_cache=True)
    return time.perf_counter() - t0


def with_kernel(model, kernel: str):
    """A copy of a quantized model whose 4-bit layers use another kernel."""
    from tinyllm.kernels.qlinear import QuantLinear

    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, QuantLinear):
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, QuantLinear(mod.qweight, mod.bias, kernel))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    fp, _tok = tinyllm.load("smollm2-135m")
    models = {"fp32": fp}
    for name, cfg in {
        "rtn-4b-g64": tinyllm.RTN(bits=4, group_size=64),
        "rtn-8b-pc": tinyllm.RTN(bits=8, group_size=-1, sym=True),
    }.items():
        models[name] = copy.deepcopy(fp)
        tinyllm.quantize(models[name], cfg)
    models["rtn-4b-g64-torch-int4"] = with_kernel(models["rtn-4b-g64"], "int4")
    prompt = torch.randint(0, 49152, (1, 64))
    token = torch.randint(0, 49152, (1, 1))
    times: dict[str, list[float]] = {n: [] for n in [*models, "fp32-onednn"]}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(step_time(model, prompt, token))
        with fast_linears(fp, 1):
            times["fp32-onednn"].append(step_time(fp, prompt, token))
    med = {n: statistics.median(t) for n, t in times.items()}
    result = {
        "median_ms": {n: 1e3 * v for n, v in med.items()},
        "ratio_to_fp32": {n: v / med["fp32"] for n, v in med.items()},
        "kernels": sorted(
            {m.kernel for m in models["rtn-4b-g64"].modules() if hasattr(m, "kernel")}
        ),
        "repeats": args.repeats,
    }
    write_result(OUT, result)


if __name__ == "__main__":
    main()
