"""Peers: tinyllm's streaming GPTQ beside llm-compressor's GPTQ, same model, same calibration.

Run: .venv/bin/python benchmarks/bench_peer_gptq.py [--samples 32] [--seq-len 512]
         [--rows tinyllm,llmcompressor] [--force] [--table] [--wait-for-model NAME --until HH:MM]

Reproduce from scratch:

    # the model: 2 decoder blocks with the exact Llama-3.2-1B shapes, seeded random bf16 weights
    .venv/bin/python benchmarks/synthetic.py llama-3.2-1b --layers 2 \
        --out /work/synth/llama-3.2-1b-2l
    # the peer, in its own environment (the project's .venv stays untouched); torch first and
    # pinned, so pip keeps the CPU build and never pulls CUDA wheels
    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/peer-constraints.txt
    /work/peer-venv/bin/pip install -c /tmp/peer-constraints.txt llmcompressor==0.14.0.1
    # the measurement (both runs one after the other, never in parallel)
    .venv/bin/python benchmarks/bench_peer_gptq.py --samples 32 --seq-len 512

The calibration windows are drawn once, here, with tinyllm's own sampler
(`tinyllm.data.calibration.calibration_windows(tokenizer, "enwiki", samples, seq_len, seed)`, the
call `tinyllm quantize` makes) and saved to benchmarks/work/peer/windows-MODEL-NxL-seedS.pt; the
peer runner (benchmarks/peer_llmcompressor_gptq.py, run by --peer-python) feeds the same token ids
to `oneshot` as a pre-tokenized dataset, unshuffled. Each tool then runs in its own process under
`/usr/bin/time -v` (bench_estimate.timed: peak RSS = Maximum resident set size, wall and CPU
seconds, load average before and after; the CPU is shared on this host, so wall time under load is
longer than on an idle machine, peak RSS is not affected):

- tinyllm: `tinyllm quantize MODEL --method gptq --bits 4 --group-size 128 --samples N
  --seq-len L --stream on -o ...` (read, compress and write one block at a time; calibration in
  float32; asymmetric grid, act-order, static groups, damp 0.01: the CLI's defaults);
- llm-compressor: the README's flow: `AutoModelForCausalLM.from_pretrained(dtype="auto")` (the
  whole model in its stored bf16), `oneshot(recipe=GPTQModifier(targets="Linear",
  scheme="W4A16", ignore=["lm_head"]))` with its default pipeline on the CPU (symmetric grid,
  static act-order, damp 0.01, block 128), `save_pretrained(save_compressed=True)`.

Both times include loading the model and writing the compressed checkpoint. Outputs go to
benchmarks/work/peer/ (git-ignored); results to benchmarks/results/peer_gptq.json, one entry per
row with its provenance, plus `ours_over_theirs` (tinyllm / llm-compressor peak RSS and seconds).
`--wait-for-model NAME` holds each row until `pgrep -f "quantize /work/synth/NAME"` finds nothing
(polled every 60 s) or the UTC time `--until` has passed; what was still running then is recorded
with the row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_estimate import timed
from provenance import provenance
from rowtable import rows_present, run_rows, table_head

HERE = Path(__file__).parent
OUT = HERE / "results" / "peer_gptq.json"
WORK = HERE / "work" / "peer"
SYNTH = Path("/work/synth")
CLI = [sys.executable, "-m", "tinyllm.cli"]
RUNNER = HERE / "peer_llmcompressor_gptq.py"
# tinyllm-stream-off (the whole model loaded, in float32) is not run unless named in --rows
ROWS = ["tinyllm", "llmcompressor", "tinyllm-stream-off"]
DEFAULT_ROWS = ROWS[:2]
GB = 1e9


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/work/synth/llama-3.2-1b-2l")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    ap.add_argument(
        "--wait-for-model",
        help="hold each row while `pgrep -f 'quantize /work/synth/NAME'` finds a process",
    )
    ap.add_argument("--until", default="19:00", help="UTC HH:MM after which rows run anyway")
    ap.add_argument("--results", type=Path, default=OUT, help="the JSON file rows merge into")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows to run")
    ap.add_argument("--force", action="store_true", help="re-run rows that have results")
    ap.add_argument("--table", action="store_true", help="only print the Markdown table")
    return ap.parse_args()


def windows_file(args: argparse.Namespace) -> Path:
    """tinyllm's calibration windows for the model's tokenizer, saved as a [N, L] int64 tensor."""
    import torch

    from tinyllm.data.calibration import calibration_windows
    from tinyllm.models.load import load_tokenizer

    name = Path(args.model).name
    path = WORK / f"windows-{name}-{args.samples}x{args.seq_len}-seed{args.seed}.pt"
    if not path.exists():
        tok = load_tokenizer(Path(args.model))
        ids = calibration_windows(tok, "enwiki", args.samples, args.seq_len, args.seed)
        WORK.mkdir(parents=True, exist_ok=True)
        torch.save(ids.to(torch.int64).contiguous(), path)
    return path


def running(pattern: str) -> list[str]:
    """Command lines of the processes `pgrep -f pattern` finds, this one left out."""
    done = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.split(" ", 1)[0] != str(os.getpid())]
    return [ln[:200] for ln in lines]


def wait_for_quiet(args: argparse.Namespace) -> dict:
    """Hold while --wait-for-model's quantize runs, until --until. -> what was seen."""
    if not args.wait_for_model:
        return {}
    # built here, not given on the command line, so that this process never matches it
    pattern = f"quantize {SYNTH}/{args.wait_for_model}"
    t0 = time.time()
    while (busy := running(pattern)) and time.strftime("%H:%M", time.gmtime()) < args.until:
        print(f"waiting: {len(busy)} process(es) match {pattern!r}", flush=True)
        time.sleep(60)
    return {"waited_seconds": round(time.time() - t0), "still_running_at_start": busy}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def context(args: argparse.Namespace, windows: Path) -> dict:
    """What every row records about its setting."""
    return {
        "model": args.model,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "calibration_tokens": args.samples * args.seq_len,
        "windows": {
            "file": windows.name,
            "sha256": hashlib.sha256(windows.read_bytes()).hexdigest(),
        },
        "other_tinyllm_jobs_at_start": running("tinyllm.cli"),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def run_tinyllm(args: argparse.Namespace, windows: Path, stream: str = "on") -> dict:
    out = WORK / f"tinyllm-stream-{stream}-{args.samples}x{args.seq_len}"
    cmd = [*CLI, "quantize", args.model, "--method", "gptq", "--bits", "4", "--group-size", "128"]
    cmd += ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    cmd += ["--seed", str(args.seed), "--stream", stream, "-o", str(out), "--overwrite"]
    row = {**wait_for_quiet(args), **context(args, windows)}
    log = WORK / f"{out.name}.log"
    measured = timed(cmd, log)
    import tinyllm

    result = {
        "command": " ".join(["tinyllm", *cmd[3:]]),
        **row,
        "measured": measured,
        "versions": {"tinyllm": getattr(tinyllm, "__version__", "unknown"), **_versions()},
    }
    if measured["returncode"] != 0:
        return {**result, "error": _tail(log)}
    info = json.loads((out / "tinyllm.json").read_text())
    return {
        **result,
        "report_seconds": round(info["seconds"], 1),
        "checkpoint_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
    }


def _tail(log: Path, lines: int = 40) -> str:
    """The last lines of a run's log before /usr/bin/time's report."""
    text = log.read_text(errors="replace").split("\tCommand being timed")[0]
    return "\n".join(text.splitlines()[-lines:])


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("transformers", "torch")}


def run_peer(args: argparse.Namespace, windows: Path) -> dict:
    out = WORK / f"llmcompressor-{args.samples}x{args.seq_len}"
    info_file = WORK / f"{out.name}.info.json"
    info_file.unlink(missing_ok=True)
    cmd = [args.peer_python, str(RUNNER), args.model, str(windows), str(out)]
    cmd += ["--info", str(info_file)]
    row = {**wait_for_quiet(args), **context(args, windows)}
    log = WORK / f"{out.name}.log"
    measured = timed(cmd, log)
    result = {"command": " ".join(cmd), **row, "measured": measured}
    if measured["returncode"] != 0 or not info_file.exists():
        return {**result, "error": _tail(log)}
    return {**result, **json.loads(info_file.read_text())}


def ratio(results: dict) -> dict | None:
    """tinyllm / llm-compressor peak RSS, wall and CPU seconds, from the streaming row (or, where
    it failed, the in-memory one) and the peer's; None unless both succeeded on one calibration."""
    theirs = results.get("llmcompressor")
    ok = [n for n in ("tinyllm", "tinyllm-stream-off") if "error" not in results.get(n, {"error"})]
    if not ok or not theirs or "error" in theirs:
        return None
    ours = results[ok[0]]
    if (ours["samples"], ours["seq_len"]) != (theirs["samples"], theirs["seq_len"]):
        return None
    a, b = ours["measured"], theirs["measured"]
    keys = ("peak_rss_bytes", "seconds", "cpu_seconds")
    return {"ours": ok[0], **{k: round(a[k] / b[k], 3) for k in keys}}


def table(results: dict) -> str:
    lines = table_head("tool | calibration | peak RSS GB | wall s | CPU s | load before/after")
    for name, r in rows_present(results, ROWS):
        if "measured" not in r:
            continue
        m = r["measured"]
        shape = f"{r['samples']} x {r['seq_len']}"
        err = " (failed)" if "error" in r else ""
        lines.append(
            f"| {name}{err} | {shape} | {m['peak_rss_bytes'] / GB:.2f} | {m['seconds']:.0f} | "
            f"{m['cpu_seconds']:.0f} | {m['load_before']} / {m['load_after']} |"
        )
    r = results.get("ours_over_theirs")
    if r:
        lines.append(f"\ntinyllm / llm-compressor: {json.dumps(r)}")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    windows = windows_file(args)
    runners = {
        "tinyllm": run_tinyllm,
        "llmcompressor": run_peer,
        "tinyllm-stream-off": lambda a, w: run_tinyllm(a, w, "off"),
    }
    run_rows(args.results, args, lambda name: runners[name](args, windows), table)
    results = json.loads(args.results.read_text())
    if (r := ratio(results)) is not None and not args.table:
        results["ours_over_theirs"] = {**r, "provenance": provenance()}
        tmp = args.results.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(args.results)
        print(f"tinyllm / llm-compressor: {json.dumps(r)}")


if __name__ == "__main__":
    main()
