"""Recipe gates: validated at load, checked per stage and at the end, stop the run, mark the
report and gates.xml, and `--resume` after a recipe change continues from the right place."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.pipeline.test_runner import recipe_text
from tests.test_cli import assert_clean_error, run
from tinyllm.pipeline.recipe import RecipeError, parse_recipe
from tinyllm.pipeline.runner import StageGateError, run_recipe

TWO = (
    "  - {type: magnitude, sparsity: 0.5, gates: [GATE]}\n"
    "  - {type: rtn, bits: 4, group_size: 32}\n"
)


def _recipe(model: Path, corpus: Path, gate: str = "kld<=100", final: str = "") -> str:
    text = recipe_text(model, corpus, TWO.replace("GATE", gate), "[{format: hf}]")
    return text + (f"gates: [{final}]\n" if final else "")


def _error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml")
    return str(info.value)


def test_gates_are_read_and_checked_when_the_recipe_loads() -> None:
    r = parse_recipe(
        "model: m\nstages:\n  - {type: wanda, gates: [kld<=0.1, 'size<=90MB']}\n  - {type: rtn}\n"
        "gates: [ppl_ratio<=1.2]\n"
    )
    assert [g.text for g in r.gates_of(0)] == ["kld<=0.1", "size<=90MB"] and r.gates_of(1) == []
    assert [g.metric for g in r.gates] == ["ppl_ratio"]
    assert r.normalized()["gates"] == {
        "stages": [["kld<=0.1", "size<=90MB"], []],
        "final": ["ppl_ratio<=1.2"],
    }
    assert "gates: kld<=0.1, size<=90MB" in r.outline()[0] and r.outline()[-1].startswith("final")
    msg = _error("model: m\nstages:\n  - type: rtn\n    gates: [kld<=0.1, kld=>2]\n")
    assert msg.startswith("r.yaml, line 4, stage 1, field gates.1") and "METRIC OP VALUE" in msg
    msg = _error("model: m\nstages:\n  - {type: rtn}\ngates: [kld<=1.1x]\n")
    assert "field gates.0" in msg and "absolute limit" in msg
    msg = _error("model: m\nstages:\n  - {type: rtn}\ngates: ['task:analogy>=0.9x']\n")
    assert "evaluation: {tasks: ['analogy']}" in msg
    parse_recipe("model: m\nevaluation: {tasks: [analogy]}\ngates: ['task:analogy>=0.9x']\n")
    assert "a list of gates" in _error("model: m\nstages:\n  - {type: rtn, gates: {a: 1}}\n")


def test_a_failed_gate_stops_the_run_and_a_gates_change_resumes(tiny_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    text = _recipe(tiny_dir, corpus_file, "kld<=1e-9")
    with pytest.raises(StageGateError, match="stage 1 \\(magnitude\\) failed its gates") as info:
        run_recipe(parse_recipe(text), text, out)
    assert "--resume" in str(info.value) and "kld" in str(info.value)
    state = json.loads((out / "state.json").read_text())
    (stage,) = state["stages"]  # stage 2 never ran, nothing was exported
    assert not stage["gates"][0]["passed"] and stage["gates"][0]["value"] > 1e-9
    assert state["stopped"] and not state["finished"] and state["exports"] == []
    assert not (out / "stages" / "02-rtn").exists() and not (out / "export").exists()
    md = (out / "report.md").read_text()
    assert "FAIL 1/1: kld<=1e-9" in md and "**The run stopped:**" in md and "**FAIL**" in md
    assert 'class="fail"' in (out / "report.html").read_text()
    suite = ET.parse(out / "gates.xml").getroot().find("testsuite")
    assert suite.get("name") == "stage 1: magnitude" and suite.get("failures") == "1"
    # the same recipe fails again on resume; loosened gates pass on the stored scores
    with pytest.raises(StageGateError):
        run_recipe(parse_recipe(text), text, out, resume=True)
    loose = _recipe(tiny_dir, corpus_file, "kld<=100")
    done = run_recipe(parse_recipe(loose), loose, out, resume=True)
    assert done["finished"] and done["stopped"] is None and len(done["stages"]) == 2
    first = done["stages"][0]
    assert first["seconds"] == stage["seconds"] and first["eval"] == stage["eval"]  # not rerun
    assert first["gates"][0]["passed"] and done["exports"]
    assert (out / "recipe.yaml").read_text() == loose
    assert "pass (1)" in (out / "report.md").read_text()


def test_resume_after_a_stage_change_reruns_from_that_stage(tiny_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    text = _recipe(tiny_dir, corpus_file)
    first = run_recipe(parse_recipe(text), text, out)
    changed = text.replace("bits: 4", "bits: 3")
    again = run_recipe(parse_recipe(changed), changed, out, resume=True)
    assert again["stages"][0] == first["stages"][0]  # kept as it was
    assert again["stages"][1]["config"]["bits"] == 3 and first["stages"][1]["config"]["bits"] == 4
    assert again["stages"][1]["weights_bytes"] < first["stages"][1]["weights_bytes"]
    assert again["finished"] and again["exports"]
    # a changed first stage reruns both; a changed evaluation is refused with the difference
    third = changed.replace("sparsity: 0.5", "sparsity: 0.25")
    final = run_recipe(parse_recipe(third), third, out, resume=True)
    assert final["stages"][0]["eval"]["sparsity"] == pytest.approx(0.25, abs=0.01)
    assert final["stages"][1]["eval"]["sparsity"] == pytest.approx(0.25, abs=0.01)
    other = third.replace("windows: 2", "windows: 3")
    with pytest.raises(RecipeError, match="evaluation changed") as info:
        run_recipe(parse_recipe(other), other, out, resume=True)
    assert "-  windows: 2" in str(info.value) and "+  windows: 3" in str(info.value)


def test_final_gates_block_the_exports_and_the_cli_exits_1(tiny_dir, corpus_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(tiny_dir, corpus_file, final="size<=0.01x"))
    out = tmp_path / "run"
    p = run("run", str(recipe), "-o", str(out))
    assert_clean_error(p, "the finished model failed the final gates")
    assert p.returncode == 1 and "size" in p.stderr and "| 2 | rtn |" in p.stdout
    state = json.loads((out / "state.json").read_text())
    assert len(state["stages"]) == 2 and state["exports"] == [] and not state["finished"]
    assert not state["final_gates"][0]["passed"]
    root = ET.parse(out / "gates.xml").getroot()
    assert [s.get("name") for s in root.findall("testsuite")] == ["stage 1: magnitude", "final"]
    recipe.write_text(_recipe(tiny_dir, corpus_file, final="size<=10x"))
    p = run("run", str(recipe), "-o", str(out), "--resume")
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "state.json").read_text())["exports"]


def test_task_gates_read_the_tasks_the_run_scores(tiny_dir, corpus_file, tmp_path):
    stages = "  - {type: rtn, bits: 4, group_size: 32, gates: ['task:analogy>=0.5x']}\n"
    text = recipe_text(tiny_dir, corpus_file, stages).replace(
        "seq_len: 16}\nstages", "seq_len: 16, tasks: [analogy], task_limit: 6}\nstages"
    )
    text += "gates: ['task:analogy>=1.01']\n"  # an accuracy above 1 cannot pass
    with pytest.raises(StageGateError, match="final gates"):
        run_recipe(parse_recipe(text), text, tmp_path / "run")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["original"]["eval"]["tasks"]["analogy"]["n"] == 6
    (stage,) = state["stages"]
    gate = stage["gates"][0]
    assert gate["passed"] and gate["value"] == stage["eval"]["tasks"]["analogy"]["accuracy"]
    assert gate["limit"] == pytest.approx(
        0.5 * state["original"]["eval"]["tasks"]["analogy"]["accuracy"]
    )
    assert "| analogy |" in (tmp_path / "run" / "report.md").read_text()
