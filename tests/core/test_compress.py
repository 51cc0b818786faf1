"""One registry of named steps and one compression entry point: the CLI and a one-stage recipe
with the same settings write the same checkpoint; a flag of another method is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import assert_clean_error, run
from tinyllm.core import registry
from tinyllm.core.steps import REGISTRY

# Fields of tinyllm.json that measure the run rather than describe its result.
MEASURED = ("seconds", "peak_rss_bytes")


def test_every_registered_name_has_a_registered_apply_and_records_its_name() -> None:
    from tinyllm.pipeline.recipe import stage_classes
    from tinyllm.prune.api import step_classes as pruners
    from tinyllm.quant.api import step_classes as quantizers

    classes = registry.step_classes()
    assert list(stage_classes()) == registry.names()  # recipe stage types
    assert list(quantizers()) == registry.names("quantize")
    assert list(pruners()) == registry.names("prune")
    assert {"distill", "recover", "movement", "imp"} <= set(registry.names("train"))
    for name, cls in classes.items():
        assert cls in REGISTRY, f"{name}: no apply registered"
        assert registry.name_of(cls) == name
    from tinyllm.quant.int8 import Int8Dynamic

    assert Int8Dynamic().describe()["type"] == "int8-dynamic"


def test_run_help_lists_every_stage_type() -> None:
    p = run("run", "--help")
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())
    for name in registry.names():
        assert name in text, f"`tinyllm run --help` omits stage type {name}"


def test_a_flag_of_another_method_is_an_error_naming_the_method_options(tiny_dir, tmp_path):
    p = run(
        "quantize", str(tiny_dir), "--method", "rtn", "--damp", "0.1", "-o", str(tmp_path / "q")
    )
    assert_clean_error(p, "--damp does not apply to --method rtn; rtn takes --bits, --group-size")
    assert "--mse" in p.stderr and not (tmp_path / "q").exists()
    p = run("prune", str(tiny_dir), "--method", "wanda", "--rounds", "2", "-o", str(tmp_path / "p"))
    assert_clean_error(p, "--rounds does not apply to --method wanda")
    # the same flag is fine where the method takes it
    args = ["--method", "awq", "--base", "gptq", "--damp", "0.02", "--clip"]
    p = run("quantize", str(tiny_dir), *args, "--calib-corpus", "/nonexistent", "-o", "x")
    assert "does not apply" not in p.stderr


def stable(path: Path) -> dict:
    meta = json.loads(path.read_text())
    return {k: v for k, v in meta.items() if k not in MEASURED}


def test_cli_and_one_stage_recipe_write_identical_checkpoints(tiny_dir, corpus_file, tmp_path):
    from tinyllm.pipeline.recipe import parse_recipe
    from tinyllm.pipeline.runner import run_recipe

    cli = tmp_path / "cli"
    calib = ["--calib-corpus", str(corpus_file), "--samples", "4", "--seq-len", "16"]
    args = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--sym", *calib]
    p = run("quantize", str(tiny_dir), *args, "-o", str(cli))
    assert p.returncode == 0, p.stderr
    text = (
        f"model: {tiny_dir}\n"
        f"calibration: {{corpus: {corpus_file}, samples: 4, seq_len: 16}}\n"
        f"evaluation: {{corpus: {corpus_file}, windows: 2, seq_len: 16}}\n"
        "stages:\n  - {type: gptq, bits: 4, group_size: 32, sym: true}\n"
    )
    state = run_recipe(parse_recipe(text), text, tmp_path / "run")
    stage = tmp_path / "run" / state["stages"][0]["dir"]
    weights = (cli / "model.safetensors").read_bytes()
    assert weights == (stage / "model.safetensors").read_bytes()
    a, b = stable(cli / "tinyllm.json"), stable(stage / "tinyllm.json")
    assert a == b
    assert a["steps"][0]["type"] == "gptq" and a["calibration"]["samples"] == 4
    assert a["quantized"]  # it did quantize: float checkpoints would be trivially identical


def test_compress_from_python_with_a_training_step(teacher_dir, corpus, tmp_path):
    """Movement pruning as a step: tinyllm.compress runs it, records it, saves the model."""
    import tinyllm
    from tinyllm.models.sparsity import sparsity_of
    from tinyllm.prune.movement import Movement

    step = Movement(
        sparsity=0.5, steps=10, every=2, batch=2, seq_len=32, lr=1e-3, eval_every=0,
        eval_seq_len=32, final_eval_windows=2, corpus=str(corpus),
    )  # fmt: skip
    result = tinyllm.compress(str(teacher_dir), [step], out=tmp_path / "m")
    assert sparsity_of(result.model) == pytest.approx(0.5, abs=0.01)
    model, _ = tinyllm.load(tmp_path / "m")
    assert sparsity_of(model) == pytest.approx(0.5, abs=0.01)
    meta = json.loads((tmp_path / "m" / "tinyllm.json").read_text())
    assert [s["type"] for s in meta["steps"]] == ["movement"]
    assert meta["distill"]["after"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (tmp_path / "m.train" / "summary.json").is_file()  # the trainer's state beside it


def test_the_recipe_docs_name_every_stage_type() -> None:
    text = (Path(__file__).parents[2] / "docs" / "recipes.md").read_text()
    table = text[text.index("| type | kind |") :].split("\n\n")[0]  # the stage table
    for name in registry.names():
        assert name in table, f"docs/recipes.md stage table omits {name}"


def test_training_steps_are_recipe_stages() -> None:
    from tinyllm.pipeline.recipe import RecipeError, parse_recipe
    from tinyllm.prune.movement import IMP, Movement

    text = "model: m\nstages:\n  - {type: movement, sparsity: 0.5, steps: 200}\n"
    text += "  - {type: imp, sparsity: 0.4, rounds: 2, rewind: true}\n"
    assert parse_recipe(text).stages == [
        Movement(sparsity=0.5, steps=200),
        IMP(sparsity=0.4, rounds=2, rewind=True),
    ]
    late = "model: m\nstages:\n  - {type: gptq}\n  - {type: movement, sparsity: 0.5}\n"
    with pytest.raises(RecipeError, match="movement after quantization"):
        parse_recipe(late)
    with pytest.raises(RecipeError, match="unknown field 'ratio'"):
        parse_recipe("model: m\nstages:\n  - {type: movement, ratio: 0.5}\n")
