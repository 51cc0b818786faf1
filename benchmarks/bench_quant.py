"""Issue 3 table: weight quantization of smollm2-135m, each row through the CLI in its own process.

Run: .venv/bin/python benchmarks/bench_quant.py [--rows NAME,...] [--samples 128] [--table]
     [--only PREFIX]   (--only s21-: session 21's table, every method at the CLI's defaults)
Each row runs `tinyllm quantize` (checkpoint kept in benchmarks/work/quant/ROW) then
`tinyllm eval DIR --reference smollm2-135m --json`; results
are merged into benchmarks/results/quant_smollm2.json row by row, so an interrupted run resumes
(finished rows are skipped unless --force). `--table` prints the Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from rowtable import cli_eval, row_args, run_rows

OUT = Path(__file__).parent / "results" / "quant_smollm2.json"
KEEP = Path(__file__).parent / "work" / "quant"  # checkpoints of the rows (git-ignored)
CLI = [sys.executable, "-m", "tinyllm.cli"]
SETTINGS = {  # name -> (bits, group, sym)
    "4b-g64": (4, 64, False),
    "4b-g32-sym": (4, 32, True),
    "3b-g32": (3, 32, False),
    "4b-pc": (4, -1, False),
    "8b-pc": (8, -1, True),
}
ROWS: dict[str, list[str]] = {"fp32": []}
for setting, (bits, group, sym) in SETTINGS.items():
    for method in ("rtn", "gptq", "awq-rtn", "awq-gptq"):
        name, _, base = method.partition("-")
        flags = ["--method", name, "--bits", str(bits), "--group-size", str(group)]
        flags += ["--base", base] if base else []
        # rows with a GPTQ step were measured before the weighted grid became the default, and
        # AWQ+GPTQ rows before GPTQ took AWQ's clamped range as its grid (session 13)
        flags += ["--no-weighted-grid"] if "gptq" in method else []
        flags += ["--base-search"] if method == "awq-gptq" else []
        ROWS[f"{method}-{setting}"] = flags + (["--sym"] if sym else ["--asym"])
ROWS["nf4-b64"] = ["--method", "nf4", "--group-size", "64"]
# Asymmetric calibration (GPTQ --float-targets 0.25, GPTAQ's strength) and bf16 calibration forwards
FT = ["--float-targets", "0.25"]
ROWS["gptq-ft-4b-g64"] = [*ROWS["gptq-4b-g64"], *FT]
ROWS["gptq-ft-3b-g32"] = [*ROWS["gptq-3b-g32"], *FT]
ROWS["awq-gptq-ft-3b-g32"] = [*ROWS["awq-gptq-3b-g32"], *FT]
ROWS["awq-gptq-ft-4b-g32-sym"] = [*ROWS["awq-gptq-4b-g32-sym"], *FT]
ROWS["gptq-4b-g64-bf16"] = [*ROWS["gptq-4b-g64"], "--calib-dtype", "bfloat16"]
# True-sequential GPTQ (q/k/v, o, gate/up, down in stages), alone and with float targets
TS = ["--true-sequential"]
for _row in ("gptq-4b-g64", "gptq-3b-g32", "gptq-4b-g32-sym", "gptq-ft-3b-g32"):
    ROWS[_row.replace("gptq-", "gptq-ts-", 1)] = [*ROWS[_row], *TS]
for _row in ("awq-gptq-ft-3b-g32", "awq-gptq-ft-4b-g32-sym"):
    ROWS[_row.replace("-ft-", "-ts-ft-")] = [*ROWS[_row], *TS]
# GPTQ's group clipping search weighted by diag H (importance-matrix style)
WG, NWG = ["--weighted-grid"], ["--no-weighted-grid"]
for _row in (
    "gptq-4b-g64",
    "gptq-3b-g32",
    "gptq-4b-g32-sym",
    "gptq-ft-3b-g32",
    "gptq-ft-4b-g64",
    "awq-gptq-ft-3b-g32",
    "awq-gptq-ft-4b-g32-sym",
):
    ROWS[_row.replace("gptq-", "gptq-wg-", 1)] = [f for f in ROWS[_row] if f not in NWG] + WG
ROWS["gptq-wg-ft-4b-g32-sym"] = [*ROWS["gptq-wg-4b-g32-sym"], *FT]
# AWQ+RTN at 4-bit per channel without its clipping search (the row that loses to RTN on ppl)
ROWS["awq-rtn-4b-pc-noclip"] = [*ROWS["awq-rtn-4b-pc"], "--no-clip"]
# ... and with AWQ's clipping but without the base's own (unweighted) clipping search after it
ROWS["awq-rtn-4b-pc-nomse"] = [*ROWS["awq-rtn-4b-pc"], "--no-mse"]
# (session 12: that rule now holds for an RTN base by default;) the same question for GPTQ's base
ROWS["awq-gptq-nomse-4b-g32-sym"] = [
    *[f for f in ROWS["awq-gptq-4b-g32-sym"] if f != "--base-search"],
    "--no-mse",
]
# Other calibration samples (seeds 1, 2) of the rows closest to the targets: GPTQ's result
# moves by a few percent between runs, so one draw cannot settle a target that close.
for _row in (
    "awq-gptq-ft-3b-g32",
    "awq-gptq-ft-4b-g32-sym",
    "gptq-wg-ft-3b-g32",
    "gptq-wg-4b-g64",
    "gptq-wg-ft-4b-g32-sym",
):
    for _seed in (1, 2):
        ROWS[f"{_row}-seed{_seed}"] = [*ROWS[_row], "--seed", str(_seed)]
# Least-squares refit of the group scales (codes fixed), 2 rounds (--refit-scales 2)
RF = ["--refit-scales", "2"]
for _row in ("gptq-wg-ft-4b-g32-sym", "gptq-wg-4b-g64"):
    ROWS[_row.replace("-wg-", "-wg-rf2-", 1)] = [*ROWS[_row], *RF]
for _seed in (1, 2):
    ROWS[f"gptq-wg-rf2-ft-4b-g32-sym-seed{_seed}"] = [
        *ROWS["gptq-wg-rf2-ft-4b-g32-sym"],
        "--seed",
        str(_seed),
    ]
# The same flags again after loading stopped leaving the weights mapped from the safetensors file
# (session 12; compare peak RSS with gptq-wg-4b-g64 and its seed rows)
ROWS["gptq-wg-4b-g64-rerun"] = list(ROWS["gptq-wg-4b-g64"])
# ... and after the calibration glue stopped holding the linears it swaps out (session 14: each
# replaced float weight, 14 MB per block, stayed alive until the end of the run)
ROWS["gptq-wg-4b-g64-freed"] = list(ROWS["gptq-wg-4b-g64"])
# ... and after Hessians multiply only the upper triangle of x^T x and GPTQ's column loop runs on
# transposed weights in lazy batches of 32 columns (session 16: same math, less time)
ROWS["gptq-wg-4b-g64-symh"] = list(ROWS["gptq-wg-4b-g64"])
# Twice the calibration windows (256 x 512) and a stronger float-target step at 4-bit g32 sym
ROWS["gptq-wg-rf2-ft-4b-g32-sym-256"] = [*ROWS["gptq-wg-rf2-ft-4b-g32-sym"], "--samples", "256"]
ROWS["gptq-wg-rf2-ft50-4b-g32-sym"] = [*ROWS["gptq-wg-4b-g32-sym"], *RF, "--float-targets", "0.5"]

# Session 13: AWQ+GPTQ with GPTQ's grid taken from AWQ's clamped range (--no-mse: the static group
# grids are the clamped weights' min/max, no second, activation-blind clipping search), with float
# targets, and with two scale refits, on three calibration draws
NOMSE_FT = [f for f in ROWS["awq-gptq-ft-4b-g32-sym"] if f != "--base-search"] + ["--no-mse"]
for _seed in (0, 1, 2):
    _tail = ["--seed", str(_seed)] if _seed else []
    _sfx = f"-seed{_seed}" if _seed else ""
    ROWS[f"awq-gptq-nomse-ft-4b-g32-sym{_sfx}"] = [*NOMSE_FT, *_tail]
    ROWS[f"awq-gptq-nomse-rf2-ft-4b-g32-sym{_sfx}"] = [*NOMSE_FT, *RF, *_tail]

# ... and the table's other AWQ+GPTQ settings with that default (no --base-search)
for _setting in ("4b-g64", "3b-g32", "4b-pc", "8b-pc"):
    ROWS[f"awq-gptq-clamped-{_setting}"] = [
        f for f in ROWS[f"awq-gptq-{_setting}"] if f != "--base-search"
    ]

# Rows above that run GPTQ on its own without float targets were measured before such GPTQ became
# true-sequential by default (session 17); they pin --no-true-sequential to keep their meaning.
for _name, _flags in ROWS.items():
    if _flags[1:2] == ["gptq"] and not {"--float-targets", "--true-sequential"} & set(_flags):
        _flags.append("--no-true-sequential")
# Session 17: GPTQ's defaults (weighted grid; true-sequential as one staged pass, about one block
# forward) at the table's settings
for _setting in ("4b-g64", "3b-g32", "4b-g32-sym", "4b-pc", "8b-pc"):
    _pins = {"--no-true-sequential", "--no-weighted-grid"}
    ROWS[f"gptq-wg-staged-{_setting}"] = [f for f in ROWS[f"gptq-{_setting}"] if f not in _pins]
ROWS["gptq-wg-staged-4b-g64-seed1"] = [*ROWS["gptq-wg-staged-4b-g64"], "--seed", "1"]
# Session 18: the same flags after the staged pass began keeping down_proj's inputs (in float16)
# for the final forward; the rows above were measured with those inputs recomputed
for _setting in ("4b-g64", "3b-g32", "4b-g32-sym", "4b-pc", "8b-pc"):
    ROWS[f"gptq-wg-kept16-{_setting}"] = list(ROWS[f"gptq-wg-staged-{_setting}"])

# Session 19: bf16 calibration with bf16 Hessians (the 32 largest input channels' rows exact)
for _setting in ("4b-g64", "3b-g32", "4b-g32-sym"):
    ROWS[f"gptq-wg-bf16h-{_setting}"] = [
        *ROWS[f"gptq-wg-kept16-{_setting}"],
        "--calib-dtype",
        "bfloat16",
    ]
# ... and AWQ in bf16 (its activation statistics and scale search), alone and as GPTQ's front end
for _row in ("awq-rtn-4b-g64", "awq-gptq-clamped-4b-g64"):
    ROWS[f"{_row}-bf16"] = [*ROWS[_row], "--calib-dtype", "bfloat16"]

# Session 21: the table re-measured with today's code at the CLI's defaults (no pinned
# flags): every method at every setting, NF4, the two float-target configurations the 3-bit and
# g32 targets rely on, and GPTQ 4-bit g64 with bf16 calibration (the time target). `--only s21-`
# prints just these rows (with the fp32 row) and their flags.
NOW = "s21-"
for _setting in ("4b-g64", "4b-g32-sym", "3b-g32", "8b-pc", "4b-pc"):
    _bits, _group, _sym = SETTINGS[_setting]
    for _method in ("rtn", "gptq", "awq-rtn", "awq-gptq"):
        _name, _, _base = _method.partition("-")
        ROWS[f"{NOW}{_method}-{_setting}"] = [
            *["--method", _name, "--bits", str(_bits), "--group-size", str(_group)],
            *(["--base", _base] if _base else []),
            "--sym" if _sym else "--asym",
        ]
ROWS[f"{NOW}nf4-b64"] = ["--method", "nf4", "--group-size", "64"]
ROWS[f"{NOW}gptq-ft-3b-g32"] = [*ROWS[f"{NOW}gptq-3b-g32"], *FT]
ROWS[f"{NOW}awq-gptq-ft-4b-g32-sym"] = [*ROWS[f"{NOW}awq-gptq-4b-g32-sym"], *FT, "--no-mse"]
ROWS[f"{NOW}gptq-4b-g64-bf16"] = [*ROWS[f"{NOW}gptq-4b-g64"], "--calib-dtype", "bfloat16"]


def run_row(name: str, flags: list[str], samples: int) -> dict:
    target = "smollm2-135m"
    meta: dict = {}
    if flags:
        out = KEEP / name  # kept: bench_gguf.py exports the Q4_0-grid ones
        shutil.rmtree(out, ignore_errors=True)
        if "--samples" in flags:  # a row that sets its own calibration size keeps it
            samples = int(flags[flags.index("--samples") + 1])
        cmd = [*CLI, "quantize", "smollm2-135m", *flags, "--samples", str(samples), "-o", str(out)]
        subprocess.run(cmd, check=True)
        meta = json.loads((out / "tinyllm.json").read_text())
        target = str(out)
    result = cli_eval(target)
    size = sum(p.stat().st_size for p in Path(target).rglob("*.safetensors")) if flags else None
    return {
        "command": " ".join(["tinyllm quantize smollm2-135m", *flags]) if flags else "fp32",
        "eval": result,
        "quant_seconds": meta.get("seconds"),
        "quant_peak_rss_bytes": meta.get("peak_rss_bytes"),
        "weights_bytes_on_disk": size,
        "samples": samples if flags else None,
    }


def table(results: dict, only: str | None = None) -> str:
    """All rows measured, or (only=PREFIX) the fp32 row and those named PREFIX..., with flags."""
    fp = results["fp32"]["eval"]["perplexity"]
    names = [
        n for n in ROWS if n in results and (only is None or n == "fp32" or n.startswith(only))
    ]
    flags_col = only is not None
    lines = [
        "| row | perplexity | x FP32 | KLD | top-1 | bits/w | weights on disk | quant s "
        "| quant peak RSS |" + (" flags |" if flags_col else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if flags_col else ""),
    ]
    for name in names:
        r = results[name]
        e = r["eval"]
        disk = (
            f"{r['weights_bytes_on_disk'] / 2**20:.1f} MiB" if r["weights_bytes_on_disk"] else "-"
        )
        qs = f"{r['quant_seconds']:.1f}" if r["quant_seconds"] is not None else "-"
        rss = f"{r['quant_peak_rss_bytes'] / 1e9:.2f} GB" if r["quant_peak_rss_bytes"] else "-"
        row = name.removeprefix(only) if only and name != "fp32" else name
        line = (
            f"| {row} | {e['perplexity']:.3f} | {e['perplexity'] / fp:.3f} | {e['kld']:.4f} | "
            f"{e['top1_agreement']:.4f} | {e['bits_per_weight']:.3f} | {disk} | {qs} | {rss} |"
        )
        if flags_col:
            line += f" `{' '.join(ROWS[name])}` |" if ROWS[name] else " - |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument(
        "--only", metavar="PREFIX", help="run and print only the fp32 row and rows named PREFIX..."
    )
    args = row_args(list(ROWS), ap)
    if args.only:
        keep = [n for n in args.rows.split(",") if n == "fp32" or n.startswith(args.only)]
        args.rows = ",".join(keep)
    run_rows(
        OUT,
        args,
        lambda name: run_row(name, ROWS[name], args.samples),
        lambda results: table(results, args.only),
    )


if __name__ == "__main__":
    main()
