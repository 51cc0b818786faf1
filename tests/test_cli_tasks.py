"""`tinyllm tasks`: list, export, and lm-eval's command line with the tinyllm model."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from typer.testing import CliRunner

from tinyllm.cli import app
from tinyllm.data.tasks import BUILTIN, builtin_task
from tinyllm.errors import CorpusError

runner = CliRunner()


def test_tasks_list_shows_sizes_and_whether_lm_eval_is_installed(monkeypatch):
    def no_corpus():
        raise CorpusError("corpus 'enwiki' is not here")

    builtin_task.cache_clear()  # wiki-next is built afresh, without its corpus (and fast)
    monkeypatch.setitem(BUILTIN, "wiki-next", no_corpus)
    r = runner.invoke(app, ["tasks", "list"], env={"COLUMNS": "200"})
    builtin_task.cache_clear()
    assert r.exit_code == 0, r.output
    assert "polarity" in r.output and str(len(builtin_task("polarity").docs)) in r.output
    assert "analogy-gen" in r.output and "generate" in r.output
    assert "unavailable: corpus 'enwiki' is not here" in r.output
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setattr("tinyllm.eval.lmeval.lm_eval_version", lambda: None)
    r = runner.invoke(app, ["tasks", "list"], env={"COLUMNS": "200"})
    assert "not installed (pip install 'tinyllm[tasks]'" in r.output


def test_tasks_export_writes_jsonl_and_yaml(tmp_path):
    r = runner.invoke(app, ["tasks", "export", "analogy", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    rows = (tmp_path / "t" / "analogy.jsonl").read_text().splitlines()
    assert len(rows) == len(builtin_task("analogy").docs)
    assert len(json.loads(rows[0])["choices"]) == 8
    cfg = yaml.safe_load((tmp_path / "t" / "analogy.yaml").read_text())
    assert cfg["task"] == "analogy" and cfg["output_type"] == "multiple_choice"


def test_tasks_export_of_an_unknown_task_is_a_clear_error(tmp_path):
    r = runner.invoke(app, ["tasks", "export", "nope", str(tmp_path)])
    assert r.exit_code != 0 and "unknown task 'nope'" in str(r.exception)


def test_tasks_lm_eval_runs_lm_evals_cli_with_the_tinyllm_model(tmp_path, tiny_dir):
    pytest.importorskip("lm_eval")
    runner.invoke(app, ["tasks", "export", "polarity", str(tmp_path / "t")])
    args = ["--model", "tinyllm", "--model_args", f"pretrained={tiny_dir}", "--device", "cpu"]
    args += ["--tasks", "polarity", "--include_path", str(tmp_path / "t"), "--limit", "2"]
    args += ["--output_path", str(tmp_path / "out")]
    r = runner.invoke(app, ["tasks", "lm-eval", *args])
    assert r.exit_code == 0, r.output
    (result,) = (tmp_path / "out").rglob("results_*.json")
    got = json.loads(result.read_text())
    assert got["config"]["model"] == "tinyllm" and "acc,none" in got["results"]["polarity"]
    assert got["n-samples"]["polarity"]["effective"] == 2
