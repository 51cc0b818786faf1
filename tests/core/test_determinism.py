"""The same compression command gives a bit-identical checkpoint, process after process.

Each run is a separate `tinyllm quantize` process with its own PYTHONHASHSEED (set and dict
ordering, allocation order) and thread count (OMP_NUM_THREADS: how MKL splits factorizations).
Only the run's measurements (VOLATILE: wall time, peak memory) may differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VOLATILE = ("seconds", "peak_rss_bytes")  # measurements of the run, not of its result

METHODS = {
    "gptq": ["--method", "gptq"],
    "awq-gptq": ["--method", "awq", "--base", "gptq"],
    "gptq-float-targets": ["--method", "gptq", "--float-targets", "0.25"],
}


def quantize(model: Path, corpus: Path, out: Path, args: list[str], hash_seed: int, threads: int):
    env = {
        **os.environ,
        "PYTHONHASHSEED": str(hash_seed),
        "OMP_NUM_THREADS": str(threads),
        "COLUMNS": "200",
    }
    cmd = [sys.executable, "-m", "tinyllm.cli", "quantize", str(model), "-o", str(out), *args]
    cmd += ["--group-size", "32", "--calib-corpus", str(corpus)]
    cmd += ["--samples", "8", "--seq-len", "32"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stdout + p.stderr


def stable_meta(path: Path) -> dict:
    meta = json.loads(path.read_text())
    return {k: v for k, v in meta.items() if k not in VOLATILE}


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_write_identical_checkpoints(
    method: str, tiny_dir: Path, corpus_file: Path, tmp_path: Path
):
    a, b = tmp_path / "a", tmp_path / "b"
    quantize(tiny_dir, corpus_file, a, METHODS[method], hash_seed=1, threads=2)
    quantize(tiny_dir, corpus_file, b, METHODS[method], hash_seed=2, threads=1)
    weights = sorted(p.name for p in a.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in b.glob("*.safetensors"))
    for name in [*weights, "layer_errors.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{method}: {name} differs"
    assert stable_meta(a / "tinyllm.json") == stable_meta(b / "tinyllm.json")
    assert stable_meta(a / "quant_report.json") == stable_meta(b / "quant_report.json")
    # the runs did quantize (a checkpoint of float weights would be trivially identical)
    assert json.loads((a / "tinyllm.json").read_text())["quantized"]


def test_gptq_factorization_does_not_depend_on_the_thread_count() -> None:
    """MKL's Cholesky and its inverse give other last bits at 1 and 2 threads on
    real-model-sized Hessians; GPTQ's factorization must not, or the codes drift between runs
    with other thread counts (8-20% of codes by the second block of SmolLM2)."""
    import torch

    from tinyllm.core.hessian import inverse_cholesky

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 1536, generator=g)
    H = x.T @ x / 2048  # [1536, 1536], SmolLM2's down_proj width
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = inverse_cholesky(H, 0.01, "h")
        torch.set_num_threads(2)
        two = inverse_cholesky(H, 0.01, "h")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
