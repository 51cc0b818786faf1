"""The recipe runner on a tiny model: stages checkpointed and scored, resume, reports, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tinyllm
from tests.test_cli import assert_clean_error, run
from tinyllm.pipeline.recipe import RecipeError, parse_recipe
from tinyllm.pipeline.runner import run_recipe


def recipe_text(model: Path, corpus: Path, stages: str, export: str = "[]") -> str:
    return (
        f"model: {model}\n"
        f"calibration: {{corpus: {corpus}, samples: 4, seq_len: 16}}\n"
        f"evaluation: {{corpus: {corpus}, windows: 2, seq_len: 16}}\n"
        f"stages:\n{stages}"
        f"export: {export}\n"
    )


PRUNE_QUANT = (
    "  - {type: wanda, sparsity: 0.5}\n  - {type: gptq, bits: 4, group_size: 32, sym: true}\n"
)


def test_stages_are_checkpointed_scored_reported_and_exported(tiny_dir, corpus_file, tmp_path):
    text = recipe_text(tiny_dir, corpus_file, PRUNE_QUANT, "[{format: gguf, type: q4_0}]")
    out = tmp_path / "run"
    seen = []
    state = run_recipe(parse_recipe(text), text, out, on_stage=seen.append)
    assert state["finished"] and [s["type"] for s in state["stages"]] == ["wanda", "gptq"]
    assert [r["index"] for r in seen] == [1, 2]
    wanda, gptq = state["stages"]
    assert wanda["eval"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert gptq["eval"]["sparsity"] == pytest.approx(0.5, abs=0.01)  # quantizing kept the zeros
    assert gptq["eval"]["bits_per_weight"] < 6 and wanda["eval"]["kld"] > 0
    assert gptq["weights_bytes"] < 2 * state["original"]["eval"]["params"]  # below float16
    assert gptq["report"]["layer_errors"] and gptq["peak_rss_bytes"] > 0
    model, _ = tinyllm.load(out / gptq["dir"])  # every stage is a checkpoint tinyllm loads
    assert any(hasattr(m, "qweight") for m in model.modules())
    gguf = out / state["exports"][0]["path"]
    assert gguf.is_file() and state["exports"][0]["bytes"] == gguf.stat().st_size
    md = (out / "report.md").read_text()
    assert "| 2 | gptq |" in md and "| 0 | original |" in md and "type: wanda" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page
    assert (out / "recipe.yaml").read_text() == text
    (out / "report.md").unlink()
    p = run("report", str(out))  # rebuilt from state.json alone
    assert p.returncode == 0, p.stderr
    assert (out / "report.md").read_text() == md
    assert_clean_error(run("report", str(tmp_path)), "not a tinyllm run directory")


def test_resume_skips_finished_stages_and_refuses_a_changed_recipe(tiny_dir, corpus_file, tmp_path):
    text = recipe_text(tiny_dir, corpus_file, PRUNE_QUANT)
    out = tmp_path / "run"
    first = run_recipe(parse_recipe(text), text, out)
    again = run_recipe(parse_recipe(text), text, out, resume=True)
    assert again["stages"] == first["stages"]  # nothing recomputed
    with pytest.raises(RecipeError, match="--resume to continue"):
        run_recipe(parse_recipe(text), text, out)
    changed = text.replace("samples: 4", "samples: 5")  # every stage depends on calibration
    with pytest.raises(RecipeError, match="calibration or evaluation changed") as info:
        run_recipe(parse_recipe(changed), changed, out, resume=True)
    assert "-  samples: 4" in str(info.value) and "+  samples: 5" in str(info.value)
    with pytest.raises(RecipeError, match="no run to continue"):
        run_recipe(parse_recipe(text), text, tmp_path / "empty", resume=True)


def test_cli_bad_recipes_and_outputs_are_one_line_errors(tiny_dir, corpus_file, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nstages:\n  - {type: gptq, bits: four}\n")
    assert_clean_error(run("run", str(bad)), "bad.yaml, line 3, stage 1, field bits")
    good = tmp_path / "good.yaml"
    good.write_text(recipe_text(tiny_dir, corpus_file, "  - {type: magnitude, sparsity: 0.5}\n"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_clean_error(run("run", str(good), "-o", str(blocker / "out")), "cannot write")
    missing = tmp_path / "missing.yaml"
    missing.write_text(recipe_text(tmp_path / "nope", corpus_file, "  - {type: rtn}\n"))
    p = run("run", str(missing), "-o", str(tmp_path / "m"))
    assert_clean_error(p, "missing.yaml: model: ")
    assert not (tmp_path / "m").exists()  # refused before anything was written
    p = run("recipes")
    assert p.returncode == 0 and "edge" in p.stdout and "mobile" in p.stdout


def _state(out: Path) -> dict:
    return json.loads((out / "state.json").read_text())


def test_sigkill_in_a_stage_then_resume_matches_an_uninterrupted_run(
    tiny_dir, corpus_file, tmp_path
):
    stages = (
        f"  - {{type: recover, steps: 60, batch: 2, seq_len: 16, lr: 1.0e-3, save_every: 2,"
        f" eval_seq_len: 16, corpus: {corpus_file}}}\n"
        "  - {type: rtn, bits: 4, group_size: 32}\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_dir, corpus_file, stages))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run("run", str(recipe), "-o", str(whole)).returncode == 0
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "tinyllm.cli", "run", str(recipe), "-o", str(killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "stages" / "01-recover" / "checkpoint"
    deadline = time.monotonic() + 120
    while not ckpt.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.is_dir() and not _state(killed)["finished"]  # killed inside the training stage
    p = run("run", str(recipe), "-o", str(killed), "--resume")
    assert p.returncode == 0, p.stderr
    a, b = _state(whole), _state(killed)
    assert b["finished"] and len(b["stages"]) == 2
    for sa, sb in zip(a["stages"], b["stages"], strict=True):
        assert sa["eval"]["perplexity"] == sb["eval"]["perplexity"]
        assert sa["eval"]["kld"] == sb["eval"]["kld"]


def test_a_streamed_stage_is_sharded_scored_and_resumed_like_an_in_memory_one(
    tiny_dir, corpus_file, tmp_path, monkeypatch
):
    """`stream: on` compresses one block at a time into a sharded checkpoint; the run scores
    it (weights_bytes over the shards), resumes past it, and its scores equal the in-memory
    run's. A model too big for float32 (threshold lowered) is scored lean and released while
    its stage runs: same scores."""
    import tinyllm.core.load as core_load

    stages = "  - {type: wanda, sparsity: 0.5}\n  - {type: gptq, bits: 4, group_size: 32}\n"
    text = recipe_text(tiny_dir, corpus_file, stages)
    whole = run_recipe(parse_recipe(text), text, tmp_path / "whole")
    streamed_text = "stream: on\n" + text
    recipe = parse_recipe(streamed_text)
    assert recipe.stream == "on" and parse_recipe("stream: off\n" + text).stream == "off"
    out = tmp_path / "streamed"
    streamed = run_recipe(recipe, streamed_text, out)
    for i in (0, 1):  # the second stage streams from the first's (pruned) checkpoint
        stage_dir = out / streamed["stages"][i]["dir"]
        shards = sorted(stage_dir.glob("model-*.safetensors"))
        assert shards and not (stage_dir / "model.safetensors").exists()
        assert streamed["stages"][i]["weights_bytes"] == sum(f.stat().st_size for f in shards)
        a, b = whole["stages"][i], streamed["stages"][i]
        for key in ("perplexity", "kld", "top1_agreement", "bits_per_weight", "sparsity"):
            assert a["eval"][key] == pytest.approx(b["eval"][key], rel=1e-6), key
    again = run_recipe(recipe, streamed_text, out, resume=True)  # the sharded stage counts
    assert again["stages"] == streamed["stages"]

    monkeypatch.setattr(core_load, "NARROW_BYTES", 1)  # every model is now "too big"
    lean = run_recipe(parse_recipe(streamed_text), streamed_text, tmp_path / "lean")
    assert lean["stages"][0]["eval"]["kld"] == pytest.approx(b["eval"]["kld"], rel=0.05)
    assert lean["original"]["eval"]["perplexity"] == pytest.approx(
        streamed["original"]["eval"]["perplexity"], rel=0.02
    )


def test_a_bad_stream_key_names_the_line(tiny_dir, corpus_file):
    text = "stream: sometimes\n" + recipe_text(tiny_dir, corpus_file, PRUNE_QUANT)
    with pytest.raises(RecipeError, match=r"line 1.*stream.*auto, on, off"):
        parse_recipe(text)
