"""Microbenchmarks of GPTQ's parts on SmolLM2's shapes (medians; same process, same host).

Run: .venv/bin/python benchmarks/bench_gptq_parts.py

1. The host's fp32 speed: the 4096 x 576 x 1536 product through oneDNN with a packed weight (the
   number that tells one session's machine from another's), and in bf16 where the CPU has it.
2. One batch's Hessian product x^T x (4096 tokens): the full product (`gram`) against the upper
   row blocks that `HessianAccumulator` multiplies (`add_gram_upper`, MKL's addmm_), for 576 and
   1536 inputs, and the same row blocks through oneDNN (tried in session 18, not adopted).
3. GPTQ's column loop (`_gptq`, 4-bit g64) on the q/k/v, gate/up and down stacks, with lazy
   batches of 128 columns (the paper's) and 32 (the default), and whether the codes agree.
4. One batch added to a `HessianAccumulator` in fp32 and in a bf16 pass (bf16 products plus the
   32 largest channels' rows in fp32; session 19).
5. GPTQ's clipping search of the static group grids (`group_qparams`, MSE weighted by diag H)
   on the same stacks, against the same search written out of place (session 18's code).
"""

from __future__ import annotations

import statistics
import time

import torch

from tinyllm.core.hessian import SYM_ROWS, HessianAccumulator, add_gram_upper, gram, prepare_layer
from tinyllm.core.kernels import (
    OneDNNLinear,
    calibration_precision,
    native_bf16,
    onednn_available,
)
from tinyllm.kernels.primitives import (
    SHRINK_GRID,
    _affine_params,
    fake_quant,
    group_qparams,
    grouped,
)
from tinyllm.quant.gptq import GPTQ, _gptq


def median_s(repeats: int, fn, *args) -> float:
    """Median seconds of fn(*args) over `repeats` calls, after one warm-up call."""
    fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def upper_onednn(H: torch.Tensor, x: torch.Tensor) -> None:
    """add_gram_upper's row blocks (beta = alpha = 1) as oneDNN products of x^T's rows."""
    d = x.shape[1]
    rows = -(-d // -(-d // SYM_ROWS))
    xt = x.t().contiguous()
    for i in range(0, d, rows):
        H[i : i + rows, i:] += torch.ops.mkldnn._linear_pointwise(
            xt[i : i + rows], xt[i:], None, "none", [], ""
        )


def search_out_of_place(w: torch.Tensor, importance: torch.Tensor) -> None:
    """group_qparams' weighted MSE search (4-bit g64) as session 18 wrote it: new tensors per op."""
    g = grouped(w, 64)
    lo, hi = g.amin(-1), g.amax(-1)
    scale, zero = _affine_params(lo, hi, 4, False)
    imp, best = grouped(importance[None], 64), torch.full_like(scale, float("inf"))
    for shrink in SHRINK_GRID.tolist():
        s, z = _affine_params(lo * shrink, hi * shrink, 4, False)
        err = ((fake_quant(g, s[..., None], z[..., None], 4) - g).abs().pow(2.0) * imp).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)


def accumulate(x: torch.Tensor, dtype: torch.dtype) -> None:
    """A HessianAccumulator's first two batches (the second is what every later batch costs)."""
    acc = HessianAccumulator()
    with calibration_precision(dtype):
        acc.add("layer", x)
        acc.add("layer", x)


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(4096, 576)
    linear = OneDNNLinear(torch.nn.Linear(576, 1536, bias=False), 4096)
    t = median_s(20, linear, x)
    rate = 2 * 4096 * 576 * 1536 / t / 1e9
    print(f"oneDNN 4096x576x1536 fp32: {t * 1e3:.1f} ms ({rate:.0f} GFLOP/s)")
    if native_bf16():  # the same product in bf16 (what bf16 calibration passes run)
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(1536, 576).bfloat16(), 4096)
        args = (x.bfloat16(), packed, None, "none", [], "")
        tb = median_s(20, torch.ops.mkldnn._linear_pointwise, *args)
        print(f"oneDNN 4096x576x1536 bf16: {tb * 1e3:.1f} ms ({t / tb:.1f}x faster than fp32)")

    for width in (576, 1536):
        x = torch.randn(4096, width)
        H = torch.zeros(width, width)
        full = median_s(9, gram, x)
        upper = median_s(9, add_gram_upper, H, x, 1.0, 1.0)
        dnn = median_s(9, upper_onednn, H, x) if onednn_available() else float("nan")
        print(
            f"x^T x, {width} wide: full {full * 1e3:.1f} ms, upper blocks {upper * 1e3:.1f} ms "
            f"({upper / full:.2f}x), upper blocks through oneDNN {dnn * 1e3:.1f} ms"
        )

    for rows, cols, what in ((960, 576, "q/k/v"), (3072, 576, "gate/up"), (576, 1536, "down")):
        W = torch.randn(rows, cols) * 0.02
        X = torch.randn(4096, cols) * torch.logspace(0, 1.5, cols)  # uneven channels, as in LLMs
        W, H = prepare_layer(W, 2 * X.t() @ X / 4096)
        times, codes = {}, {}
        for block in (128, 32):
            cfg = GPTQ(bits=4, group_size=64, block_size=block)
            times[block] = median_s(5, _gptq, W, H, cfg, what)
            codes[block] = _gptq(W, H, cfg, what).codes()
        same = float((codes[128] == codes[32]).float().mean())
        print(
            f"column loop {what} [{rows}, {cols}]: batches of 128 {times[128] * 1e3:.0f} ms, "
            f"of 32 {times[32] * 1e3:.0f} ms ({times[32] / times[128]:.2f}x); "
            f"codes equal {same:.5f}"
        )

    for width in (576, 1536):
        x = torch.randn(4096, width) * torch.logspace(0, 1.5, width)
        fp32 = median_s(9, accumulate, x, torch.float32)
        bf16 = median_s(9, accumulate, x, torch.bfloat16)
        print(
            f"accumulator, two 4096-token batches {width} wide: fp32 {fp32 * 1e3:.1f} ms, "
            f"bf16 pass {bf16 * 1e3:.1f} ms ({bf16 / fp32:.2f}x)"
        )

    total = {"in place": 0.0, "out of place": 0.0}
    stacks = ((960, 576, "q/k/v"), (576, 576, "o"), (3072, 576, "gate/up"), (576, 1536, "down"))
    for rows, cols, what in stacks:
        W = torch.randn(rows, cols) * torch.linspace(0.1, 3.0, cols)
        imp = torch.rand(cols) ** 4
        new = median_s(5, group_qparams, W, 4, 64, False, True, 2.0, imp)
        old = median_s(5, search_out_of_place, W, imp)
        total["in place"] += new
        total["out of place"] += old
        print(
            f"clipping search {what} [{rows}, {cols}]: in place {new * 1e3:.0f} ms, "
            f"out of place {old * 1e3:.0f} ms"
        )
    print(
        f"clipping search, one block's stacks: in place {total['in place']:.3f} s, "
        f"out of place {total['out of place']:.3f} s"
    )


if __name__ == "__main__":
    main()
