"""bf16 Hessians against exact ones on SmolLM2's real layer inputs (issue 3, session 19).

Run: .venv/bin/python benchmarks/bench_hessian_bf16.py [--blocks 0,5,15,29] [--samples 32]

Captures the inputs of q/k/v, o, gate/up and down in the chosen blocks of the float model over
calibration windows (batches of 4096 tokens), and accumulates each layer's Hessian four ways:
fp32 (the float32 default), plain bf16 products, and bf16 with the rows and columns of the k
largest channels kept in fp32 (k = 8 and the default EXACT_ROWS = 32). For each it reports the
largest entry error against a float64 reference, as a fraction of the mean diagonal (GPTQ's
dampening adds 1% of it), and GPTQ 4-bit g64's output error with that Hessian, measured with the
exact one, as a ratio to the output error GPTQ reaches with the exact Hessian. Results go to
benchmarks/results/hessian_bf16.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import tinyllm
from tinyllm.core.hessian import HessianAccumulator, add_gram_upper_bf16, output_error
from tinyllm.core.kernels import calibration_precision
from tinyllm.data.calibration import calibration_windows
from tinyllm.quant import gptq
from tinyllm.quant.gptq import GPTQ

OUT = Path(__file__).parent / "results" / "hessian_bf16.json"
LAYERS = {"qkv": ("self_attn", "q_proj"), "o": ("self_attn", "o_proj")}
LAYERS |= {"gate/up": ("mlp", "gate_proj"), "down": ("mlp", "down_proj")}
STACKS = {"qkv": ["q_proj", "k_proj", "v_proj"], "gate/up": ["gate_proj", "up_proj"]}


def accumulate(xs: list[torch.Tensor], exact: int | None) -> torch.Tensor:
    """Hessian of the batches: fp32 (exact None), plain bf16 (0) or bf16 with k exact rows."""
    if exact == 0:
        H = torch.zeros(xs[0].shape[1], xs[0].shape[1])
        n = 0
        for x in xs:
            add_gram_upper_bf16(H, x, n / (n + len(x)), 2.0 / (n + len(x)))
            n += len(x)
        return H.triu() + H.triu(1).t()
    acc = HessianAccumulator()
    saved, gptq.EXACT_ROWS = gptq.EXACT_ROWS, exact or gptq.EXACT_ROWS
    try:
        with calibration_precision(torch.bfloat16 if exact else torch.float32):
            for x in xs:
                acc.add("layer", x)
        return acc.hessian("layer")
    finally:
        gptq.EXACT_ROWS = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="0,5,15,29")
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args()
    model, tok = tinyllm.load("smollm2-135m")
    blocks = [int(b) for b in args.blocks.split(",")]
    calib = calibration_windows(tok, "enwiki", args.samples, 512, 0)
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for b in blocks:
        for layer, (part, name) in LAYERS.items():
            module = getattr(getattr(model.model.layers[b], part), name)

            def look(_m, inp, key=(b, layer)):
                inputs.setdefault(key, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1]))

            hooks.append(module.register_forward_pre_hook(look))
    with torch.no_grad():
        for i in range(0, args.samples, 8):
            model(calib[i : i + 8])
    for h in hooks:
        h.remove()
    cfg = GPTQ(bits=4, group_size=64)
    variants = {"fp32": None, "bf16 plain": 0, "bf16 exact 8": 8, "bf16 exact 32": 32}
    rows = []
    for (b, layer), xs in inputs.items():
        block = model.model.layers[b]
        part = getattr(block, LAYERS[layer][0])
        W = torch.cat(
            [getattr(part, n).weight.detach() for n in STACKS.get(layer, [LAYERS[layer][1]])]
        )
        x = torch.cat(xs)
        ref = (2 * x.double().t() @ x.double() / len(x)).float()
        mean_diag = float(ref.diagonal().mean())
        base = output_error(W, gptq.gptq_quantize(W, ref, cfg)[0].dequantize(), ref)
        row = {"block": b, "layer": layer, "width": x.shape[1]}
        row["max_diag_over_mean"] = float(ref.diagonal().max()) / mean_diag
        for label, exact in variants.items():
            H = accumulate(list(x.split(4096)), exact)
            err = output_error(
                W, gptq.gptq_quantize(W, H, cfg, f"{b}.{layer}")[0].dequantize(), ref
            )
            row[label] = {
                "max_error_over_mean_diag": float((H - ref).abs().max()) / mean_diag,
                "gptq_output_error_ratio": err / base,
            }
        rows.append(row)
        cells = " | ".join(
            f"{row[v]['max_error_over_mean_diag']:.4f} / {row[v]['gptq_output_error_ratio']:.4f}"
            for v in variants
        )
        print(f"| {b} | {layer} | {row['max_diag_over_mean']:.0f} | {cells} |", flush=True)
    OUT.write_text(json.dumps({"samples": args.samples, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
