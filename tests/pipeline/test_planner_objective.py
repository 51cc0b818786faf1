"""`tinyllm plan --objective`: the recommendation is the best verified candidate by KLD (the
default), perplexity or a task's accuracy."""

from __future__ import annotations

import pytest

from tests.test_cli import assert_clean_error, run
from tinyllm.errors import ConfigError
from tinyllm.pipeline.planner import (
    Candidate,
    Grid,
    make_plan,
    objective_key,
    parse_objective,
    plan_markdown,
)
from tinyllm.pipeline.recipe import Calibration, Evaluation


def test_parse_objective() -> None:
    assert [parse_objective(t) for t in ("kld", " ppl ", "task:analogy")] == [
        "kld",
        "ppl",
        "task:analogy",
    ]
    for bad in ("acc", "task:", "KLD2"):
        with pytest.raises(ConfigError, match="use kld"):
            parse_objective(bad)


def _cand(bits: int, ppl: float, kld: float, acc: float) -> Candidate:
    measured = {"perplexity": ppl, "kld": kld, "task": {"accuracy": acc, "stderr": 0.1}}
    return Candidate(Grid(bits, 32, True), 1000, 0.1, measured)


def test_each_objective_picks_its_best() -> None:
    a, b, c = _cand(3, 20.0, 0.30, 0.50), _cand(4, 21.0, 0.10, 0.40), _cand(5, 22.0, 0.20, 0.50)
    cands = [a, b, c]
    assert min(cands, key=objective_key("ppl")) is a
    assert min(cands, key=objective_key("kld")) is b
    assert min(cands, key=objective_key("task:analogy")) is c  # a tie on accuracy: lower KLD


def test_plan_by_task_accuracy(tiny_dir, corpus_file) -> None:
    cal = Calibration(corpus=str(corpus_file), samples=4, seq_len=16)
    ev = Evaluation(corpus=str(corpus_file), windows=2, seq_len=16)
    plan = make_plan(
        str(tiny_dir),
        "0.5x",
        calibration=cal,
        evaluation=ev,
        probe_seq_len=16,
        verify_top=2,
        embeddings=False,
        mixed=False,
        objective="task:analogy",
        task_limit=6,
    )
    assert plan.objective == "task:analogy" and plan.original["task"]["n"] == 6
    verified = [c for c in plan.candidates if c.measured]
    assert len(verified) == 2 and all(c.measured["task"]["n"] == 6 for c in verified)
    best = max(c.measured["task"]["accuracy"] for c in verified)
    assert plan.recommended.measured["task"]["accuracy"] == best
    md = plan_markdown(plan)
    assert "| task:analogy |" in md and "highest task:analogy accuracy" in md
    with pytest.raises(ConfigError, match="unknown task"):
        make_plan(str(tiny_dir), "0.5x", calibration=cal, evaluation=ev, objective="task:nope")


def test_cli_bad_objective_is_a_one_line_error(tiny_dir, tmp_path) -> None:
    p = run("plan", str(tiny_dir), "--max-size", "0.5x", "--objective", "accuracy")
    assert_clean_error(p, "--objective 'accuracy'")
