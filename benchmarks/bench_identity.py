"""Does a change alter what tinyllm computes? The same CLI commands from two commits, compared byte
for byte.

Run: .venv/bin/python benchmarks/bench_identity.py --base REV [--rows a,b] [--samples 8]

REV is checked out into a temporary git worktree; every row runs its `tinyllm` command once with
REV's sources and once with this checkout's (same venv, same calibration windows, fresh
processes), then compares the weight files (`model.safetensors`, or the exported file) byte for
byte and the perplexity `tinyllm eval` gives on a few windows. Writes
benchmarks/results/identity.json. A refactor that claims "no behaviour change" should show every
row identical; the row's time is reported beside the base's (noisy: one run each).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import ROOT, provenance

OUT = ROOT / "benchmarks" / "results" / "identity.json"
MODEL = "smollm2-135m"
# row -> (command after `tinyllm`, with {model}, {out}, {calib} placeholders; the weight file)
ROWS: dict[str, tuple[str, str]] = {
    "rtn-4b-g64": ("quantize {model} --method rtn --bits 4 --group-size 64 -o {out}", ""),
    "gptq-4b-g64": ("quantize {model} --method gptq --bits 4 --group-size 64 {calib} -o {out}", ""),
    "awq-gptq-4b-g32-sym": (
        "quantize {model} --method awq --base gptq --bits 4 --group-size 32 --sym {calib} -o {out}",
        "",
    ),
    "nf4": ("quantize {model} --method nf4 --group-size 64 -o {out}", ""),
    "smoothquant": ("quantize {model} --method smoothquant {calib} -o {out}", ""),
    "int8-dynamic": ("quantize {model} --method int8-dynamic -o {out}", ""),
    "mixed-rtn-3.5b": (
        "quantize {model} --method mixed --base rtn --avg-bits 3.5 {calib} -o {out}",
        "",
    ),
    "wanda-50": ("prune {model} --method wanda --sparsity 0.5 {calib} -o {out}", ""),
    "sparsegpt-2:4": ("prune {model} --method sparsegpt --pattern 2:4 {calib} -o {out}", ""),
    "channels-25": ("prune {model} --method channels --sparsity 0.25 {calib} -o {out}", ""),
    "gguf-q4_0": ("export {model} --type q4_0 -o {out}/model.gguf", "model.gguf"),
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(src: Path, args: list[str], env_extra: dict | None = None) -> tuple[float, str]:
    """`python -m tinyllm.cli ARGS` with `src` first on the path; (seconds, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(src), **(env_extra or {})}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tinyllm.cli", *args], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0, done.stdout


def perplexity(src: Path, model: Path, tmp: Path) -> float:
    out = tmp / "eval.json"
    run(src, ["eval", str(model), "--windows", "4", "--seq-len", "256", "--json", str(out)])
    return json.loads(out.read_text())["perplexity"]


def run_row(name: str, trees: dict[str, Path], tmp: Path, calib: str) -> dict:
    template, weights = ROWS[name]
    record: dict = {"command": "tinyllm " + template.format(model=MODEL, out="DIR", calib=calib)}
    for side, src in trees.items():
        out = tmp / f"{name}-{side}"
        if weights:  # an exported file: its directory must exist
            out.mkdir(parents=True, exist_ok=True)
        args = template.format(model=MODEL, out=out, calib=calib).split()
        seconds, _ = run(src, args)
        file = out / (weights or "model.safetensors")
        record[side] = {"seconds": round(seconds, 1), "sha256": sha256(file)}
        if not weights:
            record[side]["perplexity"] = perplexity(src, out, tmp)
    record["identical"] = record["base"]["sha256"] == record["head"]["sha256"]
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="commit to compare with (e.g. HEAD~5)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--samples", type=int, default=8, help="calibration windows of 256 tokens")
    args = ap.parse_args()
    calib = f"--samples {args.samples} --seq-len 256"
    base = subprocess.run(
        ["git", "rev-parse", "--short=7", args.base], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    with tempfile.TemporaryDirectory(prefix="tinyllm-identity-") as tmp:
        tree = Path(tmp) / "base"
        add = ["git", "worktree", "add", "--detach", str(tree), base]
        subprocess.run(add, cwd=ROOT, check=True)
        try:
            trees = {"base": tree / "src", "head": ROOT / "src"}
            for name in args.rows.split(","):
                print(f"== {name}", flush=True)
                row = run_row(name, trees, Path(tmp), calib)
                results[name] = {**row, "base_commit": base, "provenance": provenance()}
                print(json.dumps(results[name]), flush=True)
                OUT.write_text(json.dumps(results, indent=2) + "\n")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)


if __name__ == "__main__":
    main()
