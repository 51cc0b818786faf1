"""What ships is what is gated: the recipe runner scores its exported files through the runtimes
that read them, beside the stages, in the table, the report and the final gates."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.pipeline.test_runner import recipe_text
from tinyllm.export import scoring
from tinyllm.pipeline.recipe import parse_recipe
from tinyllm.pipeline.report import markdown_table
from tinyllm.pipeline.runner import StageGateError, run_recipe

RTN8 = "  - {type: rtn, bits: 8, group_size: 32, sym: true}\n"
TASKS = "evaluation: {corpus: CORPUS, windows: 2, seq_len: 16, tasks: [analogy], task_limit: 4}\n"


def _text(model, corpus, exports: str, gates: str = "", tasks: bool = False) -> str:
    text = recipe_text(model, corpus, RTN8, exports)
    if tasks:
        text = text.replace(
            f"evaluation: {{corpus: {corpus}, windows: 2, seq_len: 16}}\n",
            TASKS.replace("CORPUS", str(corpus)),
        )
    return text + (f"gates: [{gates}]\n" if gates else "")


def test_exports_are_scored_beside_the_stages(tiny_dir, corpus_file, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    exports = "[{format: gguf, type: f32}, {format: onnx}, {format: gguf, type: q4_0}]"
    text = _text(tiny_dir, corpus_file, exports, "'ppl_ratio<=2', 'top1>=0.5'", tasks=True)
    out = tmp_path / "run"
    state = run_recipe(parse_recipe(text), text, out)
    stage = state["stages"][-1]["eval"]
    f32, onnx, q4 = (x["eval"] for x in state["exports"])
    assert f32["runtime"] == "llama.cpp" and onnx["runtime"] == "onnxruntime"
    for e in (f32, onnx):  # float files of the 8-bit model: its own numbers
        assert e["perplexity"] == pytest.approx(stage["perplexity"], rel=2e-3)
        assert e["kld"] == pytest.approx(stage["kld"], rel=0.05, abs=1e-6)
        assert e["tasks"]["analogy"]["n"] == 4
        assert e["tasks"]["analogy"]["accuracy"] == stage["tasks"]["analogy"]["accuracy"]
    assert q4["kld"] > 2 * stage["kld"]  # re-quantized to 4 bits: the file is worse
    assert f32["size_bytes"] == state["exports"][0]["bytes"]
    assert [g["gate"] for g in state["exports"][0]["gates"]] == ["ppl_ratio<=2", "top1>=0.5"]
    table = markdown_table(state)
    assert "| export | gguf f32 (llama.cpp) | export/model-f32.gguf |" in table
    assert "| export | onnx fp32 (onnxruntime) |" in table
    md = (out / "report.md").read_text()
    assert "scored through llama.cpp" in md and "final on export gguf q4_0 (llama.cpp)" in md
    assert "gguf f32 (llama.cpp)" in (out / "report.html").read_text()

    def boom(*args, **kwargs):
        raise AssertionError("a finished export was scored again")

    monkeypatch.setattr(scoring, "score_windows", boom)
    again = run_recipe(parse_recipe(text), text, out, resume=True)
    assert [x["eval"] for x in again["exports"]] == [x["eval"] for x in state["exports"]]


def test_a_missing_runtime_is_not_scored_not_a_crash(tiny_dir, corpus_file, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a)
    )
    text = _text(tiny_dir, corpus_file, "[{format: gguf, type: q8_0}]", "'kld<=10'")
    state = run_recipe(parse_recipe(text), text, tmp_path / "run")
    assert state["finished"]
    (x,) = state["exports"]
    assert x["eval"]["not_scored"].startswith("llama.cpp is not installed (pip install llama")
    assert x["gates"] is None  # not scored: not gated (the final gates held on the last stage)
    assert "not scored: llama.cpp is not installed" in markdown_table(state)
    saved = json.loads((tmp_path / "run" / "state.json").read_text())
    assert saved["exports"][0]["eval"] == x["eval"]


def test_the_final_gates_hold_the_exported_file(tiny_dir, corpus_file, tmp_path):
    """The 8-bit model passes kld<=LIMIT, its q4_0 file does not: the run stops at the export;
    a looser gate resumes without exporting or scoring again."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "run"
    probe = _text(tiny_dir, corpus_file, "[{format: gguf, type: q4_0}]")
    state = run_recipe(parse_recipe(probe), probe, out)
    stage_kld, file_kld = state["stages"][-1]["eval"]["kld"], state["exports"][0]["eval"]["kld"]
    assert file_kld > 2 * stage_kld
    limit = f"{(stage_kld * file_kld) ** 0.5:.3g}"
    text = _text(tiny_dir, corpus_file, "[{format: gguf, type: q4_0}]", f"'kld<={limit}'")
    with pytest.raises(StageGateError, match=r"export 1 \(gguf q4_0 \(llama.cpp\)\) failed"):
        run_recipe(parse_recipe(text), text, out, resume=True)
    saved = json.loads((out / "state.json").read_text())
    assert saved["final_gates"][0]["passed"] and not saved["exports"][0]["gates"][0]["passed"]
    assert "export export/model-q4_0.gguf" in (out / "gates.xml").read_text()
    assert "FAIL 1/1" in markdown_table(saved).splitlines()[-1]
    looser = _text(tiny_dir, corpus_file, "[{format: gguf, type: q4_0}]", "'kld<=100'")
    done = run_recipe(parse_recipe(looser), looser, out, resume=True)
    assert done["finished"] and done["exports"][0]["eval"] == saved["exports"][0]["eval"]


def test_a_runtime_that_breaks_mid_scoring_is_isolated(
    tiny_dir, corpus_file, tmp_path, monkeypatch
):
    pytest.importorskip("llama_cpp")

    def broken(*args, **kwargs):
        raise RuntimeError("llama_decode returned -1")

    monkeypatch.setattr(scoring, "score_windows", broken)
    text = _text(tiny_dir, corpus_file, "[{format: gguf, type: q8_0}]")
    state = run_recipe(parse_recipe(text), text, tmp_path / "run")
    assert state["finished"] and state["stages"][-1]["eval"]["perplexity"] > 0
    why = state["exports"][0]["eval"]["not_scored"]
    assert why == "llama.cpp failed while scoring: RuntimeError: llama_decode returned -1"
