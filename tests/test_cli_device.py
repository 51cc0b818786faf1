"""--device on every command that computes: cpu and auto give the bytes the default gives (on a
machine without a GPU auto is cpu), a GPU asked for where there is none is a one-line error
before anything loads, and a recipe's `device:` key is checked the same way."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.test_cli import assert_clean_error, run

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
DEVICES = {"default": [], "cpu": ["--device", "cpu"], "auto": ["--device", "auto"]}


def _weights(directory: Path) -> bytes:
    return (directory / "model.safetensors").read_bytes()


def _same_for_every_device(make: Callable[[list[str], str], object]) -> list:
    """make(device_args, tag) -> a result; the results of default, cpu and auto."""
    results = [make(args, tag) for tag, args in DEVICES.items()]
    assert results[0] == results[1] == results[2]
    return results


def test_quantize_and_prune_write_the_same_bytes_on_cpu_and_auto(
    tiny_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    calib = ["--calib-corpus", str(corpus_file), "--samples", "4", "--seq-len", "32"]

    def quantize(device: list[str], tag: str) -> bytes:
        out = tmp_path / f"q-{tag}"
        p = run("quantize", str(tiny_dir), "--method", "gptq", "--group-size", "32", *calib,
                *device, "-o", str(out))  # fmt: skip
        assert p.returncode == 0, p.stderr
        return _weights(out)

    def prune(device: list[str], tag: str) -> bytes:
        out = tmp_path / f"p-{tag}"
        p = run("prune", str(tiny_dir), "--method", "wanda", *calib, *device, "-o", str(out))
        assert p.returncode == 0, p.stderr
        return _weights(out)

    _same_for_every_device(quantize)
    _same_for_every_device(prune)


def test_distill_writes_the_same_student_on_cpu_and_auto(
    tiny_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    def distill(device: list[str], tag: str) -> bytes:
        out = tmp_path / f"d-{tag}"
        p = run("distill", "--teacher", str(tiny_dir), "--layers", "1", "--corpus",
                str(corpus_file), "--steps", "2", "--batch", "2", "--seq-len", "16",
                "--eval-every", "0", "--final-eval-windows", "1", "--eval-seq-len", "16",
                *device, "-o", str(out))  # fmt: skip
        assert p.returncode == 0, p.stderr
        return _weights(out / "model")

    _same_for_every_device(distill)


def test_eval_and_generate_give_the_same_results_on_cpu_and_auto(
    tiny_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    timing = {"eval_seconds", "tokens_per_second", "peak_rss_bytes"}

    def evaluate(device: list[str], tag: str) -> dict:
        out = tmp_path / f"e-{tag}.json"
        p = run("eval", str(tiny_dir), "--corpus", str(corpus_file), "--seq-len", "16",
                "--windows", "3", "--reference", str(tiny_dir), *device,
                "--json", str(out))  # fmt: skip
        assert p.returncode == 0, p.stderr
        return {k: v for k, v in json.loads(out.read_text()).items() if k not in timing}

    def generate(device: list[str], tag: str) -> str:
        p = run("generate", str(tiny_dir), "The quick", "--max-tokens", "6", *device)
        assert p.returncode == 0, p.stderr
        return p.stdout

    scores = _same_for_every_device(evaluate)
    assert scores[0]["perplexity"] > 1
    _same_for_every_device(generate)


COMMANDS = [
    ["quantize", "{d}", "-o", "{o}"],
    ["prune", "{d}", "-o", "{o}"],
    ["distill", "--teacher", "{d}", "--layers", "1", "-o", "{o}"],
    ["eval", "{d}"],
    ["generate", "{d}", "hi"],
    ["bench", "{d}"],
    ["serve", "{d}"],
]


@NO_GPU
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_gpu_this_machine_lacks_is_a_one_line_error(
    tiny_dir: Path, tmp_path: Path, command: list[str], device: str
) -> None:
    args = [a.replace("{d}", str(tiny_dir)).replace("{o}", str(tmp_path / "o")) for a in command]
    p = run(*args, "--device", device)
    assert_clean_error(p, f"--device: device '{device}' asked for, but this machine has no")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("command", COMMANDS[:5], ids=lambda c: c[0])
def test_a_misspelt_device_is_a_one_line_error(
    tiny_dir: Path, tmp_path: Path, command: list[str]
) -> None:
    args = [a.replace("{d}", str(tiny_dir)).replace("{o}", str(tmp_path / "o")) for a in command]
    assert_clean_error(run(*args, "--device", "gpu"), "--device: unknown device 'gpu'; use auto")


def test_int8_act_keeps_auto_on_the_cpu(tiny_dir: Path, monkeypatch) -> None:
    """--int8-act runs tinyllm's CPU kernels: with auto it stays on the CPU where a GPU is, and
    with a GPU named it is refused before the model moves."""
    from tinyllm.cli import runtime
    from tinyllm.errors import ConfigError
    from tinyllm.runtime.engine import Engine, EngineConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU host
    engine = runtime._engine(str(tiny_dir), 1.0, "float32", True, "auto")
    assert engine.device.type == "cpu" and engine.cache.k[0].device.type == "cpu"
    cfg = EngineConfig(kv_memory_mb=1.0, int8_activations=True, device="cuda")
    with pytest.raises(ConfigError, match="run on tinyllm's CPU kernels, not on cuda"):
        Engine(engine.model, engine.tokenizer, cfg)
    assert engine.model.lm_head.weight.device.type == "cpu"


RECIPE = """\
model: {model}
{device}calibration: {{corpus: {corpus}, samples: 2, seq_len: 16}}
evaluation: {{corpus: {corpus}, windows: 2, seq_len: 16}}
stages:
  - {{type: rtn, bits: 4, group_size: 32}}
"""


def _recipe(tmp_path: Path, tiny_dir: Path, corpus: Path, device: str | None) -> Path:
    """A one-stage recipe file; `device: DEVICE` as its second line unless None."""
    path = tmp_path / f"r-{str(device).replace(':', '-')}.yaml"
    line = "" if device is None else f"device: {device}\n"
    path.write_text(RECIPE.format(model=tiny_dir, corpus=corpus, device=line))
    return path


@NO_GPU
def test_a_recipe_asking_for_a_gpu_is_refused_before_the_run_starts(
    tiny_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    path = _recipe(tmp_path, tiny_dir, corpus_file, "cuda")
    checked = run("run", str(path), "--check")  # spelling is valid: a recipe for another host
    assert checked.returncode == 0 and "device cuda" in checked.stdout, checked.stderr
    p = run("run", str(path), "-o", str(tmp_path / "run"))
    assert_clean_error(p, "field device: device 'cuda' asked for, but this machine has no")
    assert p.returncode == 1 and not (tmp_path / "run").exists()


def test_a_recipe_with_a_misspelt_device_names_the_field(
    tiny_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    path = _recipe(tmp_path, tiny_dir, corpus_file, "bogus")
    p = run("run", str(path), "--check")
    assert_clean_error(p, "line 2, field device: unknown device 'bogus'")


def test_a_recipe_on_cpu_scores_what_the_default_scores(
    tiny_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    """device: cpu and device: auto give the checkpoint and numbers of a recipe without the key
    (auto there too); the device is not part of what --resume compares."""
    from tinyllm.pipeline.recipe import load_recipe

    weights, scores = [], []
    for device in (None, "cpu", "auto"):
        path = _recipe(tmp_path, tiny_dir, corpus_file, device)
        out = tmp_path / f"run-{device}"
        p = run("run", str(path), "-o", str(out))
        assert p.returncode == 0, p.stderr
        weights.append(_weights(out / "stages" / "01-rtn"))
        state = json.loads((out / "state.json").read_text())
        scores.append([s["eval"]["perplexity"] for s in state["stages"]])
        assert "device" not in state["recipe"]
        assert load_recipe(path).device == (device or "auto")
    if not torch.cuda.is_available():
        assert weights[0] == weights[1] == weights[2] and scores[0] == scores[1] == scores[2]
