"""Scale: streaming GPTQ on synthetic models of real shapes, and generation from the result.

Run: .venv/bin/python benchmarks/bench_scale.py [--rows NAME,...] [--force] [--table]

Each compression row runs `tinyllm quantize MODEL --method gptq|rtn --bits 4 --group-size 128
--stream on` (group size 64 on smollm2-135m, whose 576-wide inputs 128 does not divide) in its
own process under `/usr/bin/time -v` (peak RSS = Maximum resident set size; outputs in
benchmarks/work/scale/, git-ignored) and reads the run's own report (seconds, blocks,
calibration tokens) from the checkpoint. Each generate row runs `tinyllm generate` on a
compressed row's output. The models come from benchmarks/synthetic.py (seeded random bf16
weights in the exact configs; quality means nothing, time and memory are real) under
/work/synth/NAME:

    .venv/bin/python benchmarks/synthetic.py llama-3.1-8b
    .venv/bin/python benchmarks/synthetic.py llama-3.1-8b --layers 1 \
        --out /work/synth/llama-3.1-8b-1l
    .venv/bin/python benchmarks/synthetic.py llama-3.1-8b --layers 4 \
        --out /work/synth/llama-3.1-8b-4l
    .venv/bin/python benchmarks/synthetic.py llama-3.2-1b --layers 1 \
        --out /work/synth/llama-3.2-1b-1l

Peak memory of streaming is reached within one block (every block has the same shapes; the
embedding table and the head are full size), so a model with the first blocks of a real
config shows the full model's peak at a fraction of the time, and its seconds per block are
the full model's: the one-block Llama-3.2-1B model for 128 x 512 calibration, the one- and
four-block Llama-3.1-8B models for GPTQ (a full 32-block GPTQ of the 8B shape takes hours
on 2 cores).
The full 32-block Llama-3.1-8B model is streamed with RTN (every block read, quantized,
written: the same packed size as GPTQ's), and generation runs on that checkpoint.
The CPU is shared on this host: the load average before and after each run is recorded; wall
times under load are longer than on an idle machine, peak RSS is not affected.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_estimate import timed
from rowtable import row_args, rows_present, run_rows, table_head

HERE = Path(__file__).parent
OUT = HERE / "results" / "scale.json"
WORK = HERE / "work" / "scale"
SYNTH = Path("/work/synth")
CLI = [sys.executable, "-m", "tinyllm.cli"]
GB = 1e9

# row -> (model, method, samples, seq_len)
QUANT = {
    "smollm2-135m-gptq-128x512": ("smollm2-135m", "gptq", 128, 512),
    "llama-3.2-1b(1 block)-gptq-128x512": (str(SYNTH / "llama-3.2-1b-1l"), "gptq", 128, 512),
    "llama-3.1-8b(4 blocks)-gptq-8x256": (str(SYNTH / "llama-3.1-8b-4l"), "gptq", 8, 256),
    "llama-3.1-8b(1 block)-gptq-8x256": (str(SYNTH / "llama-3.1-8b-1l"), "gptq", 8, 256),
    # all 32 blocks: about 2 h on 2 cores; an interrupted run resumes (--resume) when rerun
    "llama-3.1-8b-gptq-8x256": (str(SYNTH / "llama-3.1-8b"), "gptq", 8, 256),
    "llama-3.1-8b-rtn": (str(SYNTH / "llama-3.1-8b"), "rtn", 0, 0),
    "llama-3.1-8b-rtn-q4_0": (str(SYNTH / "llama-3.1-8b"), "rtn", 0, 0),
}
# rows quantized onto a GGUF grid (instead of --bits 4 --group-size 128)
GRID = {"llama-3.1-8b-rtn-q4_0": ["--gguf-compatible", "q4_0"]}
# row -> (model, prune options): structured pruning streamed (activation importance), 32 x 256
PRUNE = {
    "llama-3.2-1b-channels-25%-32x256": (
        str(SYNTH / "llama-3.2-1b"),
        ["--method", "channels", "--sparsity", "0.25"],
    ),
    "llama-3.2-1b-blocks-4-32x256": (
        str(SYNTH / "llama-3.2-1b"),
        ["--method", "blocks", "--count", "4"],
    ),
}
# row -> (source: a model directory or a compression row, export options, also in memory):
# `tinyllm export --stream on` (and off, where the model fits), then llama.cpp reads the file
EXPORT = {
    "llama-3.2-1b-export-q8_0": (str(SYNTH / "llama-3.2-1b"), ["--type", "q8_0"], True),
    "llama-3.1-8b-export-q8_0": (str(SYNTH / "llama-3.1-8b"), ["--type", "q8_0"], False),
    "llama-3.1-8b-rtn-q4_0-export": (
        "llama-3.1-8b-rtn-q4_0",
        ["--type", "q4_0", "--strict"],
        False,
    ),
}
LLAMACPP_CHECK = (
    "import sys, numpy as np; from tinyllm.export import llamacpp as l; "
    "x = l.logits(l.open_gguf(sys.argv[1], n_ctx=32), [1, 2, 3, 4]); "
    "print('llama.cpp logits', x.shape, 'finite:', bool(np.isfinite(x).all()))"
)
# row -> the compression row whose output it generates from
GENERATE = {
    "llama-3.1-8b-rtn-generate": "llama-3.1-8b-rtn",
    "llama-3.1-8b-gptq-generate": "llama-3.1-8b-gptq-8x256",
}
# streamed against in-memory on the real model: the same command with --stream on and off
IDENTITY = {"smollm2-135m-stream-identity": ("smollm2-135m", 32, 256)}
# a whole recipe (`tinyllm run`, stream: on): the original scored lean, one streamed stage,
# the stage scored against the original
RECIPE = {"llama-3.2-1b-recipe-rtn": str(SYNTH / "llama-3.2-1b")}
RECIPE_TEXT = """model: {model}
stream: on
evaluation: {{corpus: enwiki, windows: 4, seq_len: 256}}
stages:
  - {{type: rtn, bits: 4, group_size: 128}}
"""
ROWS = [*QUANT, *PRUNE, *GENERATE, *IDENTITY, *RECIPE, *EXPORT]
PROMPT = "The history of the city begins"


def _out(row: str) -> Path:
    return WORK / row.replace("(", "-").replace(")", "").replace(" ", "")


def _run_streamed(name: str, args: list[str], out: Path) -> tuple[dict, dict]:
    """Run one compression command under /usr/bin/time -v: (measured, its tinyllm.json)."""
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / f"{out.name}.log"
    measured = timed(args, log)
    if measured["returncode"] != 0:
        raise SystemExit(f"{name} failed: see {log}")
    return measured, json.loads((out / "tinyllm.json").read_text())


def run_quant(name: str) -> dict:
    model, method, samples, seq_len = QUANT[name]
    out = _out(name)
    group = "64" if model == "smollm2-135m" else "128"  # 128 does not divide its 576 inputs
    args = [*CLI, "quantize", model, "--method", method]
    args += GRID.get(name, ["--bits", "4", "--group-size", group])
    if samples:
        args += ["--samples", str(samples), "--seq-len", str(seq_len)]
    else:  # data-free RTN: plain rounding (the clipping search costs minutes per 8B block)
        args += ["--no-mse"]
    resume = (out.parent / f"{out.name}.stream0" / "journal.json").is_file()
    args += ["--stream", "on", "-o", str(out), "--resume" if resume else "--overwrite"]
    measured, info = _run_streamed(name, args, out)
    config = json.loads((out / "config.json").read_text())
    blocks = int(config["num_hidden_layers"])
    tokens = max(samples * seq_len, 1)
    return {
        "command": " ".join(["tinyllm", *args[3:]]),
        "model": model,
        "blocks": blocks,
        "calibration_tokens": tokens,
        "measured": measured,
        "report_seconds": round(info["seconds"], 1),
        "seconds_per_block": round(info["seconds"] / blocks, 2),
        "us_per_block_token": round(1e6 * info["seconds"] / blocks / tokens, 2),
        "checkpoint_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "source_bytes": _source_bytes(model),
    }


def run_prune(name: str) -> dict:
    """`tinyllm prune --stream on` with a structured method: peak RSS, seconds per block."""
    model, options = PRUNE[name]
    out = _out(name).with_name(_out(name).name.replace("%", "pct"))
    args = [*CLI, "prune", model, *options, "--samples", "32", "--seq-len", "256"]
    args += ["--stream", "on", "-o", str(out), "--overwrite"]
    measured, info = _run_streamed(name, args, out)
    source = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    return {
        "command": " ".join(["tinyllm", *args[3:]]),
        "model": model,
        "measured": measured,
        "report_seconds": round(info["seconds"], 1),
        "seconds_per_block": round(info["seconds"] / source, 2),
        "checkpoint_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "source_bytes": _source_bytes(model),
    }


def _source_bytes(model: str) -> int | None:
    """The bytes of the source model's safetensors files (None for a registered name)."""
    files = list(Path(model).glob("*.safetensors")) if Path(model).is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def run_generate(name: str) -> dict:
    src = _out(GENERATE[name])
    args = [*CLI, "generate", str(src), PROMPT, "--max-tokens", "16"]
    measured = timed(args, WORK / f"{name}.log")
    text = (WORK / f"{name}.log").read_text(errors="replace")
    if measured["returncode"] != 0:
        raise SystemExit(f"{name} failed: see {WORK / f'{name}.log'}")
    command = " ".join(["tinyllm", *args[3:]])
    return {"command": command, "measured": measured, "log_tail": text[-600:]}


def run_identity(name: str) -> dict:
    """GPTQ with --stream on and off: are the stored tensors the same, byte for byte?"""
    import torch
    from safetensors.torch import load_file

    model, samples, seq_len = IDENTITY[name]
    tensors, measured = {}, {}
    for stream in ("off", "on"):
        out = WORK / f"{name}-{stream}"
        args = [*CLI, "quantize", model, "--method", "gptq", "--bits", "4", "--group-size", "64"]
        args += ["--samples", str(samples), "--seq-len", str(seq_len), "--stream", stream]
        measured[stream] = timed([*args, "-o", str(out), "--overwrite"], WORK / f"{out.name}.log")
        tensors[stream] = {}
        for f in sorted(out.glob("*.safetensors")):
            tensors[stream].update(load_file(str(f)))
    a, b = tensors["off"], tensors["on"]
    same = [k for k in a if k in b and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])]
    return {
        "command": " ".join(["tinyllm", *args[3:], "-o OUT"]) + " (--stream off, then on)",
        "tensors": len(a),
        "identical_tensors": len(same),
        "identical": len(same) == len(a) == len(b),
        "measured": measured["on"],
        "measured_in_memory": measured["off"],
    }


def run_recipe(name: str) -> dict:
    """`tinyllm run` on a recipe with one streamed stage: peak RSS of the whole run."""
    out = _out(name)
    WORK.mkdir(parents=True, exist_ok=True)
    recipe = WORK / f"{out.name}.yaml"
    recipe.write_text(RECIPE_TEXT.format(model=RECIPE[name]))
    args = [*CLI, "run", str(recipe), "-o", str(out), "--overwrite"]
    measured = timed(args, WORK / f"{out.name}.log")
    if measured["returncode"] != 0:
        raise SystemExit(f"{name} failed: see {WORK / f'{out.name}.log'}")
    state = json.loads((out / "state.json").read_text())
    stage = state["stages"][0]
    return {
        "command": f"tinyllm run {recipe.name} -o OUT --overwrite",
        "recipe": recipe.read_text(),
        "measured": measured,
        "stage_seconds": round(stage["seconds"], 1),
        "stage_peak_rss_bytes": stage["peak_rss_bytes"],
        "stage_weights_bytes": stage["weights_bytes"],
        "original_eval_seconds": round(state["original"]["eval"]["eval_seconds"], 1),
        "stage_eval_seconds": round(stage["eval"]["eval_seconds"], 1),
        "source_bytes": _source_bytes(RECIPE[name]),
    }


def run_export(name: str) -> dict:
    """`tinyllm export --stream on` (and off where `whole`): peak RSS, same bytes, llama.cpp."""
    import filecmp

    source, options, whole = EXPORT[name]
    src = str(_out(source)) if source in QUANT else source
    WORK.mkdir(parents=True, exist_ok=True)
    measured, paths = {}, {}
    for stream in ("on", "off") if whole else ("on",):
        paths[stream] = WORK / f"{_out(name).name}.{stream}.gguf"
        args = [*CLI, "export", src, *options, "--stream", stream]
        log = WORK / f"{paths[stream].stem}.log"
        measured[stream] = timed([*args, "-o", str(paths[stream]), "--overwrite"], log)
        if measured[stream]["returncode"] != 0:
            raise SystemExit(f"{name} failed: see {log}")
    identical = filecmp.cmp(paths["on"], paths["off"], shallow=False) if whole else None
    if whole:
        paths.pop("off").unlink()
    log = WORK / f"{_out(name).name}.llamacpp.log"
    check = timed([sys.executable, "-c", LLAMACPP_CHECK, str(paths["on"])], log)
    return {
        "command": " ".join(["tinyllm", "export", src, *options, "--stream on"]),
        "measured": measured["on"],
        "measured_in_memory": measured.get("off"),
        "identical_to_in_memory": identical,
        "gguf_bytes": paths["on"].stat().st_size,
        "source_bytes": _source_bytes(src),
        "llamacpp": {**check, "output": log.read_text(errors="replace")[-300:]},
    }


def run_row(name: str) -> dict:
    if name in EXPORT:
        return run_export(name)
    if name in IDENTITY:
        return run_identity(name)
    if name in RECIPE:
        return run_recipe(name)
    if name in PRUNE:
        return run_prune(name)
    return run_quant(name) if name in QUANT else run_generate(name)


def table(results: dict) -> str:
    lines = table_head("row | peak RSS | wall s | s / block | us / block / token | load")
    for name, r in rows_present(results, ROWS):
        m = r["measured"]
        per_block = r.get("seconds_per_block", "")
        per_token = r.get("us_per_block_token", "")
        load = f"{m['load_before']} -> {m['load_after']}"
        lines.append(
            f"| {name} | {m['peak_rss_bytes'] / GB:.2f} GB | {m['seconds']} | {per_block} | "
            f"{per_token} | {load} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    run_rows(OUT, row_args(ROWS), run_row, table)
