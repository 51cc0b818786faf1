"""Microbenchmarks of GPTQ's parts on SmolLM2's shapes (medians; same process, same host).

Run: .venv/bin/python benchmarks/bench_gptq_parts.py

1. The host's fp32 speed: the 4096 x 576 x 1536 product through oneDNN with a packed weight (the
   number that tells one session's machine from another's).
2. One batch's Hessian product x^T x (4096 tokens): the full product (`gram`) against the upper
   row blocks that `HessianAccumulator` multiplies (`add_gram_upper`, MKL's addmm_), for 576 and
   1536 inputs, and the same row blocks through oneDNN (tried in session 18, not adopted).
3. GPTQ's column loop (`_gptq`, 4-bit g64) on the q/k/v, gate/up and down stacks, with lazy
   batches of 128 columns (the paper's) and 32 (the default), and whether the codes agree.
"""

from __future__ import annotations

import statistics
import time

import torch

from tinyllm.core.kernels import OneDNNLinear, onednn_available
from tinyllm.quant.gptq import GPTQ, SYM_ROWS, _gptq, add_gram_upper, gram, prepare_layer


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


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(4096, 576)
    linear = OneDNNLinear(torch.nn.Linear(576, 1536, bias=False), 4096)
    t = median_s(20, linear, x)
    rate = 2 * 4096 * 576 * 1536 / t / 1e9
    print(f"oneDNN 4096x576x1536 fp32: {t * 1e3:.1f} ms ({rate:.0f} GFLOP/s)")

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


if __name__ == "__main__":
    main()
