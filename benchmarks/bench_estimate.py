"""`tinyllm estimate` against measured runs: peak RSS and seconds, estimate / measured.

Run: .venv/bin/python benchmarks/bench_estimate.py [--rows NAME,...] [--force]

Each row estimates a job with `tinyllm.core.estimate`, then runs the real command under
`/usr/bin/time -v` in its own process (outputs in benchmarks/work/estimate/, git-ignored) and
records its peak RSS (Maximum resident set size), wall seconds and CPU seconds, with the load
average before and after (the CPU is shared: a loaded host stretches wall time, not the peak
RSS). Results merge into benchmarks/results/estimate.json, one entry per row.

Synthetic models (benchmarks/synthetic.py) are expected under /work/synth/NAME.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "results" / "estimate.json"
WORK = HERE / "work" / "estimate"
SYNTH = Path("/work/synth")
CLI = [sys.executable, "-m", "tinyllm.cli"]

# row -> (model, job settings, extra quantize options)
ROWS: dict[str, tuple[str, dict, list[str]]] = {
    "smollm2-135m-gptq-16x256": (
        "smollm2-135m",
        {"method": "gptq", "samples": 16, "seq_len": 256, "stream": "on"},
        [],
    ),
    "smollm2-360m-gptq-16x256": (
        str(SYNTH / "smollm2-360m"),
        {"method": "gptq", "samples": 16, "seq_len": 256, "stream": "on"},
        [],
    ),
    "smollm2-360m-rtn": (
        str(SYNTH / "smollm2-360m"),
        {"method": "rtn", "samples": 16, "seq_len": 256, "stream": "on"},
        [],
    ),
    # Llama-3.2-1B's shapes with 2 blocks (benchmarks/synthetic.py --layers 2): the full
    # model's peak (every block is alike) in an eighth of the time
    "llama-3.2-1b-2l-gptq-16x256": (
        str(SYNTH / "llama-3.2-1b-2l"),
        {"method": "gptq", "samples": 16, "seq_len": 256, "stream": "on"},
        [],
    ),
    # the sizes of BENCHMARKS.md's Scale rows: 135M and the first block of Llama-3.2-1B at
    # 128 x 512, the first block of Llama-3.1-8B at 8 x 256 (its peak is the full model's)
    "smollm2-135m-gptq-128x512": (
        "smollm2-135m",
        {"method": "gptq", "samples": 128, "seq_len": 512, "stream": "on", "group_size": 64},
        ["--group-size", "64"],
    ),
    "llama-3.2-1b-1l-gptq-128x512": (
        str(SYNTH / "llama-3.2-1b-1l"),
        {"method": "gptq", "samples": 128, "seq_len": 512, "stream": "on"},
        ["--group-size", "128"],
    ),
    "llama-3.1-8b-1l-gptq-8x256": (
        str(SYNTH / "llama-3.1-8b-1l"),
        {"method": "gptq", "samples": 8, "seq_len": 256, "stream": "on"},
        ["--group-size", "128"],
    ),
    # generate: `tinyllm generate MODEL Hello` (64 tokens, the default and the estimate's)
    "smollm2-135m-generate": ("smollm2-135m", {"job": "generate", "method": None}, []),
    "smollm2-360m-generate": (str(SYNTH / "smollm2-360m"), {"job": "generate", "method": None}, []),
}


def job_args(model: str, job: dict, out: Path, extra: list[str]) -> list[str]:
    """The command a row runs."""
    if job.get("job") == "generate":
        return [*CLI, "generate", model, "Hello", *extra]
    return quantize_args(model, job, out, extra)


def quantize_args(model: str, job: dict, out: Path, extra: list[str]) -> list[str]:
    args = [*CLI, "quantize", model, "--method", job["method"], "--bits", "4"]
    if job["method"] in ("gptq", "awq"):
        args += ["--samples", str(job["samples"]), "--seq-len", str(job["seq_len"])]
    return [*args, "--stream", job["stream"], "-o", str(out), "--overwrite", *extra]


def timed(args: list[str], log: Path) -> dict:
    """Run args under /usr/bin/time -v. -> peak RSS bytes, wall and CPU seconds, return code."""
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(["/usr/bin/time", "-v", *args], stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")

    def field(name: str) -> float:
        m = re.search(rf"{re.escape(name)}: ([\d.]+)", text)
        return float(m.group(1)) if m else float("nan")

    return {
        "returncode": p.returncode,
        "peak_rss_bytes": int(field("Maximum resident set size (kbytes)") * 1024),
        "seconds": round(wall, 1),
        "cpu_seconds": round(field("User time (seconds)") + field("System time (seconds)"), 1),
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def estimate_row(name: str, host: object) -> dict:
    """The estimator's side of a row, at the host rates `host`."""
    from tinyllm.core.estimate import Job, estimate

    model, settings, _ = ROWS[name]
    est = estimate(model, Job(**settings), host)
    return {
        "estimate": {"peak_rss_bytes": est.peak_bytes, "seconds": round(est.seconds, 1)},
        "memory_parts": est.memory,
        "time_parts": {k: round(v, 1) for k, v in est.time.items()},
    }


def with_ratios(row: dict) -> dict:
    est, got = row["estimate"], row["measured"]
    row["ratio"] = {
        "peak_rss": round(est["peak_rss_bytes"] / got["peak_rss_bytes"], 3),
        "seconds": round(est["seconds"] / got["seconds"], 3),
    }
    return row


def reestimate(results: dict) -> None:
    """Recompute every row's estimate with today's constants, at the host rates measured just
    before that row ran (no job is run again)."""
    from tinyllm.core.estimate import Host

    for name, row in results.items():
        h = row["host"]
        host = Host("cpu", h["gflops"], h["bandwidth_gbs"], True, "measured before the run")
        row.update(estimate_row(name, host))
        with_ratios(row)


def run_row(name: str) -> dict:
    from tinyllm.core.estimate import host_profile

    model, settings, extra = ROWS[name]
    host = host_profile("cpu", refresh=True)  # at the load the job is about to meet
    row = estimate_row(name, host)
    WORK.mkdir(parents=True, exist_ok=True)
    measured = timed(job_args(model, settings, WORK / name, extra), WORK / f"{name}.log")
    row = {
        "model": model,
        "job": {"job": "compress", **settings, "extra": extra},  # settings may name another job
        **row,
        "measured": measured,
        "host": {"gflops": round(host.gflops, 1), "bandwidth_gbs": round(host.bandwidth_gbs, 2)},
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    return with_ratios(row)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", help="comma-separated rows (default: all)")
    p.add_argument("--force", action="store_true", help="rerun rows already in the results")
    p.add_argument(
        "--reestimate", action="store_true", help="only recompute the estimates of stored rows"
    )
    args = p.parse_args()
    rows = args.rows.split(",") if args.rows else list(ROWS)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    if args.reestimate:
        reestimate(results)
        OUT.write_text(json.dumps(results, indent=2) + "\n")
        return
    for name in rows:
        if name in results and not args.force:
            continue
        results[name] = run_row(name)
        r = results[name]
        print(
            f"{name}: estimate/measured peak RSS {r['ratio']['peak_rss']}, seconds "
            f"{r['ratio']['seconds']} (measured {r['measured']})",
            flush=True,
        )
        OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
