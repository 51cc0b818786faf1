"""Quantization time of two versions of the code on the same machine, runs interleaved.

Run: .venv/bin/python benchmarks/bench_ab.py --base COMMIT [--repeats 2] [-- QUANTIZE FLAGS]

The machine is shared and its host changes between sessions (the same GPTQ run took 148 s in one
session and 270-317 s in another), so an absolute time says little; a ratio against the other
version, measured in the same session with the runs alternating (base, new, base, new, ...), does.
The base version is checked out into a git worktree (benchmarks/work/ab/BASE) and run with this
checkout's virtual environment, with PYTHONPATH pointing at its sources. Each run is a
`tinyllm quantize` in a fresh process; the reported seconds exclude loading (what the issue
targets) and peak RSS is the process's. Results go to benchmarks/results/ab_<name>.json.
Default flags: GPTQ 4-bit g64 asymmetric, 128 x 512 calibration (issue 3's time target).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work" / "ab"
DEFAULT_FLAGS = ["--method", "gptq", "--bits", "4", "--group-size", "64", "--asym"]


def checkout(commit: str) -> tuple[str, Path]:
    """(full hash, its sources) in a worktree of `commit`, made once."""
    sha = subprocess.run(
        ["git", "rev-parse", commit], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    tree = WORK / sha[:12]
    if not (tree / "src").is_dir():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True)
    return sha, tree / "src"


def quantize(src: Path, flags: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "tinyllm.cli", "quantize", "smollm2-135m", *flags, "-o", str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=WORK)
    meta = json.loads((out / "tinyllm.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": meta["seconds"], "peak_rss_bytes": meta["peak_rss_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="commit to compare against (e.g. HEAD~3)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each version")
    ap.add_argument("--name", default="gptq_4b_g64", help="results file: ab_NAME.json")
    ap.add_argument("flags", nargs="*", help="tinyllm quantize flags (after --)")
    args = ap.parse_args()
    flags = args.flags or DEFAULT_FLAGS
    base_sha, base_src = checkout(args.base)
    head_sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],  # results files do not count
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    runs: dict[str, list[dict]] = {"base": [], "new": []}
    for r in range(args.repeats):
        for version, src in (("base", base_src), ("new", ROOT / "src")):
            print(f"== {version} run {r + 1}/{args.repeats}", flush=True)
            runs[version].append(quantize(src, flags, WORK / f"out-{version}"))
    med = {v: statistics.median(x["seconds"] for x in runs[v]) for v in runs}
    pairs = [n["seconds"] / b["seconds"] for b, n in zip(runs["base"], runs["new"], strict=True)]
    result = {
        "flags": flags,
        "base": base_sha,
        "new": head_sha + ("+uncommitted" if dirty else ""),
        "runs": runs,
        "median_seconds": med,
        "pair_ratios": pairs,
        "ratio_of_medians": med["new"] / med["base"],
    }
    out = ROOT / "benchmarks" / "results" / f"ab_{args.name}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps({k: result[k] for k in ("median_seconds", "pair_ratios")}, indent=2))
    print(f"new / base: {result['ratio_of_medians']:.3f} (wrote {out})")


if __name__ == "__main__":
    main()
