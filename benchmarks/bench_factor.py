"""The one-thread rate of GPTQ's inverse Cholesky factor (core.hessian.inverse_cholesky) at the
widths of real models, against the host micro-benchmark the estimator scales by.

Run: .venv/bin/python benchmarks/bench_factor.py [--widths 4096,8192,14336]

Prints seconds and GFLOPS (4/3 n^3 FLOPs: Cholesky, inverse, Cholesky again) per width, then the
micro-benchmark's rate (core.estimate.host_profile, measured now). The estimator's
COSTS["factor_efficiency"] is the first over the second divided by the thread count.
"""

from __future__ import annotations

import argparse
import time

import torch

from tinyllm.core.estimate import host_profile
from tinyllm.core.hessian import inverse_cholesky


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="4096,8192,14336")
    args = p.parse_args()
    torch.manual_seed(0)
    for n in (int(w) for w in args.widths.split(",")):
        X = torch.randn(n + 256, n)
        H = X.t() @ X / n
        del X
        t0 = time.perf_counter()
        inverse_cholesky(H, 0.01, f"{n}-wide")
        dt = time.perf_counter() - t0
        print(f"{n}: {dt:.2f} s, {4 / 3 * n**3 / dt / 1e9:.1f} GFLOPS (one thread)", flush=True)
        del H
    host = host_profile("cpu", refresh=True)
    print(f"micro-benchmark: {host.gflops:.1f} GFLOPS on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
