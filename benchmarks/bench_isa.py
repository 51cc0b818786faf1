"""Decode speed of the kernels' vector paths: the native build (AVX-512 on a host that has it),
the AVX2 build and the scalar build (TINYLLM_KERNEL_ISA, kernels/native.py), each through the
tinyllm runtime on the same 4-bit smollm2-135m checkpoint.

Run: .venv/bin/python benchmarks/bench_isa.py [--rounds 3]
Each round runs `tinyllm bench CKPT --concurrency 1,16 --prompt-len 64 --gen-len 64 --repeats 3`
once per path (and with `--int8-act` on the native and AVX2 builds), in turn, so a slow spell
of the shared host hits every row alike; the table
gives the median over rounds of each path's batch-1 decode tokens/s (and 16-stream tokens/s)
and its ratio to the native build's. The checkpoint is bench_runtime.py's INT4 model: `tinyllm
quantize smollm2-135m --method rtn --bits 4 --group-size 32 --sym --embed-bits 8` (the Q4_0
grid, 8-bit embeddings and tied head on the q8 kernel; speed does not depend on how the codes
were chosen). Each path's kernels are built once before timing. Writes
benchmarks/results/isa_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import write_result

HERE = Path(__file__).parent
OUT = HERE / "results" / "isa_smollm2.json"
CKPT = HERE / "work" / "isa" / "rtn-4b-g32-e8"
CLI = [sys.executable, "-m", "tinyllm.cli"]
ISAS = ["native", "avx2", "scalar"]
# rows: a vector path, and with `--int8-act` (integer kernels) where the path has them
ROWS = {**{isa: (isa, False) for isa in ISAS}, "native-int8act": ("native", True),
        "avx2-int8act": ("avx2", True)}  # fmt: skip


def _env(isa: str) -> dict:
    return {**os.environ, "TINYLLM_KERNEL_ISA": isa}


def _bench(row: str) -> list[dict]:
    isa, int8_act = ROWS[row]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.json"
        args = [*CLI, "bench", str(CKPT), "--concurrency", "1,16", "--prompt-len", "64"]
        args += ["--gen-len", "64", "--repeats", "3", "--json", str(out)]
        args += ["--int8-act"] if int8_act else []
        subprocess.run(args, check=True, env=_env(isa), capture_output=True)
        return json.loads(out.read_text())


def _decode_tps(result: list[dict], streams: int) -> float:
    level = next(r for r in result if r["concurrency"] == streams)
    return float(level["decode_tokens_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ISAS), help=f"among {', '.join(ROWS)}")
    args = ap.parse_args()
    chosen = args.rows.split(",")
    if not (CKPT / "tinyllm.json").exists():
        quant = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--sym"]
        quant += ["--embed-bits", "8"]
        subprocess.run([*CLI, "quantize", "smollm2-135m", *quant, "-o", str(CKPT)], check=True)
    probe = "from tinyllm.kernels import native; print(native.q4_kernel().isa())"
    built = {}
    for isa in sorted({ROWS[row][0] for row in chosen}):  # every path built before any timing
        done = subprocess.run([sys.executable, "-c", probe], env=_env(isa), check=True,
                              capture_output=True, text=True)  # fmt: skip
        built[isa] = done.stdout.strip().splitlines()[-1]
    runs: dict[str, list[list[dict]]] = {row: [] for row in chosen}
    for r in range(args.rounds):
        for row in chosen:
            runs[row].append(_bench(row))
            print(f"round {r + 1} {row}: {_decode_tps(runs[row][-1], 1):.1f} tok/s", flush=True)
    rows = {}
    for row in chosen:
        isa, int8_act = ROWS[row]
        one = statistics.median(_decode_tps(x, 1) for x in runs[row])
        many = statistics.median(_decode_tps(x, 16) for x in runs[row])
        rows[row] = {"built": built[isa], "int8_act": int8_act, "batch1_decode_tps": one}
        rows[row]["streams16_decode_tps"] = many
    for row in rows.values():
        for key in ("batch1", "streams16"):
            row[f"{key}_vs_native"] = row[f"{key}_decode_tps"] / rows["native"][f"{key}_decode_tps"]
    rows_flag = "" if args.rows == ",".join(ISAS) else f" --rows {args.rows}"
    command = f"benchmarks/bench_isa.py --rounds {args.rounds}{rows_flag}"
    write_result(OUT, {"command": command, "rows": rows, "runs": runs})
    for name, row in rows.items():
        print(name, json.dumps(row))


if __name__ == "__main__":
    main()
