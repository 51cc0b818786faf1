"""GPTQ's time on one block against the work no implementation of it can skip (issue 3, session 20).

Run: .venv/bin/python benchmarks/bench_gptq_floor.py [--calib-dtype float32,bfloat16] [--repeats 3]

On block 0 of smollm2-135m with its real inputs (128 x 512 calibration windows, batches of 8),
medians of R runs of each, in each calibration precision asked for:
1. forward: one pass of the block over every batch (what any block-by-block calibration needs
   at least once, to make the next block's inputs);
2. Hessians: every batch's inputs to q/k/v, o, gate/up and down added to a HessianAccumulator
   (inputs captured beforehand);
3. GPTQ: `gptq_quantize_stack` on the block's four stacks with those Hessians (4-bit g64);
4. staged GPTQ: what a run does per block, `gptq_block` on a copy of the block (the staged pass:
   stages, Hessians, GPTQ, the block's quantized outputs).
The floor is 1 + 2 + 3: the same forward, Hessians and column loops with no stage overhead.
Also timed, once per run: capturing every block's keyword arguments on a whole batch of 8 (as
before session 20) against on one sequence (`_block_kwargs`).
The report gives 4 / floor and, times 30 blocks, the whole model's estimate of both, so the
issue's 120 s can be read against what this host's arithmetic allows.
Results go to benchmarks/results/gptq_floor.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import tinyllm
from tinyllm.core.calib import _block_kwargs, _capture_kwargs, _first_inputs, run_block
from tinyllm.core.hessian import HessianAccumulator
from tinyllm.core.kernels import block_compute, calibration_precision
from tinyllm.data.calibration import calibration_windows
from tinyllm.models.anatomy import analyze
from tinyllm.quant.common import sites_by_block
from tinyllm.quant.gptq import GPTQ, gptq_block, gptq_quantize_stack

OUT = Path(__file__).parent / "results" / "gptq_floor.json"
STACKS = {  # input -> the layers that read it (SmolLM2's names)
    "qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "o": ["self_attn.o_proj"],
    "gate/up": ["mlp.gate_proj", "mlp.up_proj"],
    "down": ["mlp.down_proj"],
}


def median_s(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def measure(model, xs, kwargs, dtype: torch.dtype, repeats: int) -> dict:
    block = analyze(model).blocks[0]
    tokens = xs[0].shape[0] * xs[0].shape[1]
    cfg = GPTQ(bits=4, group_size=64)
    sites = sites_by_block(model, 64)[0]
    with calibration_precision(dtype):
        seen: dict[str, list[torch.Tensor]] = {k: [] for k in STACKS}
        hooks = [
            block.get_submodule(names[0]).register_forward_pre_hook(
                lambda _m, a, k=key: seen[k].append(a[0].reshape(-1, a[0].shape[-1]))
            )
            for key, names in STACKS.items()
        ]
        with block_compute(block, tokens):
            for x in xs:
                run_block(block, x, kwargs)
        for h in hooks:
            h.remove()

        def forward() -> None:
            with block_compute(block, tokens):
                for x in xs:
                    run_block(block, x, kwargs)

        accs: list[HessianAccumulator] = []

        def hessians() -> None:
            acc = HessianAccumulator()
            for key, batches in seen.items():
                for x in batches:
                    acc.add(key, x)
                acc.hessian(key)
            accs[:] = [acc]

        def arithmetic() -> None:
            for key, names in STACKS.items():
                Ws = [block.get_submodule(n).weight for n in names]
                gptq_quantize_stack(Ws, accs[0].hessian(key), cfg, key)

        def staged() -> None:
            copied = copy.deepcopy(block)
            mine = [dataclasses.replace(s, module=copied.get_submodule(s.local)) for s in sites]
            ys = [x.clone() for x in xs]
            gptq_block(copied, mine, ys, kwargs, cfg, {}, advance=True)

        hessians()
        result = {
            "forward": median_s(repeats, forward),
            "hessians": median_s(repeats, hessians),
            "gptq": median_s(repeats, arithmetic),
            "staged": median_s(repeats, staged),
        }
    result["floor"] = result["forward"] + result["hessians"] + result["gptq"]
    result["staged / floor"] = result["staged"] / result["floor"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib-dtype", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tok = tinyllm.load("smollm2-135m")
    model.eval()
    blocks = analyze(model).blocks
    batches = list(calibration_windows(tok, "enwiki", 128, 512, 0).split(8))
    with torch.no_grad():
        kwargs = _block_kwargs(model, blocks, batches[0])[0]
        xs = _first_inputs(model, blocks, batches)
    with torch.no_grad():
        capture = {
            "whole batch": median_s(
                args.repeats, lambda: _capture_kwargs(model, blocks, batches[0])
            ),
            "one sequence": median_s(
                args.repeats, lambda: _block_kwargs(model, blocks, batches[0])
            ),
        }
    print(
        f"kwargs capture: whole batch {capture['whole batch']:.2f} s, "
        f"one sequence {capture['one sequence']:.2f} s"
    )
    results: dict = {"kwargs capture": capture}
    for name in args.calib_dtype.split(","):
        r = measure(model, xs, kwargs, getattr(torch, name), args.repeats)
        results[name] = r
        n = len(blocks)
        print(
            f"{name}: per block forward {r['forward']:.2f} s, Hessians {r['hessians']:.2f} s, "
            f"GPTQ {r['gptq']:.2f} s -> floor {r['floor']:.2f} s; staged GPTQ {r['staged']:.2f} s "
            f"({r['staged / floor']:.2f}x the floor); x{n} blocks: floor {n * r['floor']:.0f} s, "
            f"staged {n * r['staged']:.0f} s"
        )
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
