"""Output directories: a killed overwrite leaves the complete old or the complete new checkpoint,
and --overwrite never replaces a directory tinyllm did not write."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tinyllm
from tests.conftest import tiny_model
from tinyllm.checkpoint import TINYLLM_CONFIG, WEIGHTS, check_output_dir, save_checkpoint
from tinyllm.errors import ConfigError
from tinyllm.util import fs

ROOT = Path(__file__).resolve().parents[2]

# For each line on stdin, forks a child that saves tiny checkpoints of seed 1 and 2 over the same
# directory, alternately, until it is killed; the parent says when it has reaped the child. One
# process start (imports) serves every kill.
WRITER = """
import itertools, os, sys
import torch
torch.set_num_threads(1)  # no thread pool in the parent: fork-safe
from tests.conftest import tiny_model, tiny_tokenizer
from tinyllm.checkpoint import save_checkpoint
from tinyllm.util import fs
if sys.argv[2] == "fallback":
    fs._exchange = lambda a, b: False
tok = tiny_tokenizer()
models = {s: tiny_model(vocab=len(tok), seed=s) for s in (1, 2)}
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        print("ready", os.getpid(), flush=True)
        for i in itertools.count():
            seed = 2 - i % 2
            save_checkpoint(models[seed], tok, sys.argv[1], {"seed": seed}, overwrite=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


class Writer:
    """The WRITER process: `kill_after(seconds)` starts a saving child and SIGKILLs it."""

    def __init__(self, target: Path, mode: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), mode],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def kill_after(self, seconds: float) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        ready, pid = self.proc.stdout.readline().split()
        assert ready == "ready"
        time.sleep(seconds)
        os.kill(int(pid), signal.SIGKILL)
        assert self.proc.stdout.readline().strip() == "reaped"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_kill_during_overwrite(tmp_path: Path, tokenizer, mode: str):
    """SIGKILL a process that keeps saving over a checkpoint, at random points: every time the
    directory then loads (digests verified) as exactly one complete checkpoint, old or new."""
    if mode == "exchange" and fs._renameat2() is None:
        pytest.skip("renameat2 is not available here")
    target = tmp_path / "ckpt"
    x = torch.randint(0, len(tokenizer), (1, 12))
    ref = {s: _logits(tiny_model(vocab=len(tokenizer), seed=s), x) for s in (1, 2)}
    save_checkpoint(tiny_model(vocab=len(tokenizer), seed=1), tokenizer, target, {"seed": 1})
    rng = random.Random(0)
    writer = Writer(target, mode)
    try:
        for _ in range(5):
            writer.kill_after(rng.uniform(0.05, 1.0))
            model, _ = tinyllm.load(target)  # verifies the digests; recovers an interrupted swap
            seed = json.loads((target / TINYLLM_CONFIG).read_text())["seed"]
            assert torch.equal(_logits(model, x), ref[seed])  # weights and metadata agree
    finally:
        writer.close()
    save_checkpoint(tiny_model(vocab=len(tokenizer), seed=1), tokenizer, target, {}, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # leftovers cleaned


def test_overwrite_refuses_a_foreign_directory(tmp_path: Path, tokenizer):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    model = tiny_model(vocab=len(tokenizer))
    with pytest.raises(ConfigError, match=r"--overwrite refused: .* not a tinyllm output"):
        save_checkpoint(model, tokenizer, mine, {}, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_overwrite_replaces_a_tinyllm_checkpoint(tmp_path: Path, tokenizer):
    out = tmp_path / "out"
    save_checkpoint(tiny_model(vocab=len(tokenizer), seed=1), tokenizer, out, {"n": 1})
    save_checkpoint(tiny_model(vocab=len(tokenizer), seed=2), tokenizer, out, {"n": 2}, True)
    assert json.loads((out / TINYLLM_CONFIG).read_text())["n"] == 2


def test_overwrite_of_a_file_is_refused(tmp_path: Path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_output_dir(f, overwrite=True)


def test_hf_export_can_be_overwritten_but_not_a_foreign_dir(tmp_path: Path, tokenizer):
    """HF exports carry the .tinyllm marker of atomic_dir, so re-exporting over one works."""
    from tinyllm.export import export

    model = tiny_model(vocab=len(tokenizer))
    export(model, tokenizer, tmp_path / "hf", "hf")
    assert (tmp_path / "hf" / fs.OUTPUT_MARKER).is_file()
    export(model, tokenizer, tmp_path / "hf", "hf", overwrite=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a tinyllm output"):
        export(model, tokenizer, foreign, "hf", overwrite=True)
    assert (foreign / "config.json").read_text() == "{}"


def test_cli_overwrite_refusal_and_no_verify(tmp_path: Path, tiny_dir: Path, tokenizer):
    """The CLI prints the refusal without a traceback; --no-verify loads a changed checkpoint."""
    from tests.test_cli import assert_clean_error, run

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    p = run("quantize", str(tiny_dir), "--bits", "8", "-o", str(foreign), "--overwrite")
    assert_clean_error(p, "not a tinyllm output")
    assert (foreign / "notes.txt").read_text() == "keep"
    ckpt = save_checkpoint(tiny_model(vocab=len(tokenizer)), tokenizer, tmp_path / "c", {})
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[-3] ^= 0x01
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    assert_clean_error(run("info", str(ckpt)), "--no-verify")
    p = run("info", str(ckpt), "--no-verify")
    assert p.returncode == 0, p.stderr
