"""`tinyllm eval --gate --baseline --junit`: exit codes, the gate table, the JUnit file."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.test_cli import assert_clean_error, eval_against, run


def test_gates_pass_fail_and_write_junit(tiny_dir: Path, corpus_file: Path, tmp_path: Path):
    base = tmp_path / "base.json"
    p = eval_against(tiny_dir, tiny_dir, corpus_file, 2, "--json", str(base))
    assert p.returncode == 0, p.stderr
    junit = tmp_path / "gates.xml"
    gates = ["--gate", "kld<=0.01", "--gate", "ppl<=1.0001x", "--gate", "top1>=99%"]
    p = eval_against(
        tiny_dir, tiny_dir, corpus_file, 2, *gates, "--baseline", str(base), "--junit", str(junit)
    )
    assert p.returncode == 0, p.stderr
    assert "all 3 gates passed" in p.stdout and "pass" in p.stdout
    assert ET.parse(junit).getroot().get("failures") == "0"
    # the same model fails a tighter limit and a task that was not run; junit is written anyway
    junit.unlink()
    gates = ["--gate", "ppl<=0.5x", "--gate", "task:analogy>=0.9x", "--gate", "kld<=1"]
    p = eval_against(
        tiny_dir, tiny_dir, corpus_file, 2, *gates, "--baseline", str(base), "--junit", str(junit)
    )
    assert_clean_error(p, "2 of 3 gates failed")
    assert p.returncode == 1 and "FAIL" in p.stdout and "--tasks analogy" in p.stderr
    root = ET.parse(junit).getroot()
    assert (root.get("tests"), root.get("failures")) == ("3", "2")


def test_bad_gates_and_baselines_are_one_line_errors(tiny_dir: Path, corpus_file: Path, tmp_path):
    p = eval_against(tiny_dir, tiny_dir, corpus_file, 2, "--gate", "kld=0.1")
    assert_clean_error(p, "cannot read gate 'kld=0.1'")
    p = eval_against(tiny_dir, tiny_dir, corpus_file, 2, "--gate", "ppl<=1.05x")
    assert_clean_error(p, "relative to a baseline")
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    p = eval_against(
        tiny_dir, tiny_dir, corpus_file, 2, "--gate", "ppl<=2x", "--baseline", str(bad)
    )
    assert_clean_error(p, "is not JSON")
    p = eval_against(
        tiny_dir, tiny_dir, corpus_file, 2, "--gate", "ppl<=2x", "--baseline", str(tmp_path / "x")
    )
    assert_clean_error(p, "does not exist")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    p = eval_against(
        tiny_dir, tiny_dir, corpus_file, 2, "--gate", "ppl<=2x", "--baseline", str(other)
    )
    assert_clean_error(p, "not an evaluation result")
    p = run("eval", str(tiny_dir), "--junit", str(tmp_path / "j.xml"))
    assert_clean_error(p, "add at least one --gate")
