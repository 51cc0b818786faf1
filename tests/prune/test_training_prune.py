"""Pruning inside the trainer: movement pruning's schedule and masks, iterative magnitude
pruning with rewinding."""

from __future__ import annotations

import itertools

import pytest

from tests.test_cli import assert_clean_error, run
from tinyllm.prune.movement import cubic_sparsity, imp_schedule


def test_cubic_schedule() -> None:
    assert cubic_sparsity(0, 100, 0.5, 0.1, 0.7) == 0.0
    assert cubic_sparsity(10, 100, 0.5, 0.1, 0.7) == 0.0
    assert cubic_sparsity(40, 100, 0.5, 0.1, 0.7) == pytest.approx(0.5 * (1 - 0.5**3))
    assert cubic_sparsity(70, 100, 0.5, 0.1, 0.7) == 0.5
    assert cubic_sparsity(99, 100, 0.5, 0.1, 0.7) == 0.5


def test_imp_schedule_removes_the_same_fraction_each_round() -> None:
    s = imp_schedule(0.5, 3)
    assert s[-1] == pytest.approx(0.5)
    survivors = [1 - x for x in [0.0, *s]]
    ratios = [b / a for a, b in itertools.pairwise(survivors)]
    assert ratios == pytest.approx([ratios[0]] * 3)


def test_movement_reaches_its_sparsity_and_saves_a_sparse_model(teacher_dir, corpus, tmp_path):
    import tinyllm
    from tinyllm.distill import trainer as tr
    from tinyllm.models.sparsity import sparsity_of
    from tinyllm.prune.movement import MovementPruner

    cfg = tr.DistillConfig(
        steps=10,
        batch=2,
        seq_len=32,
        lr=1e-3,
        beta=1.0,
        eval_every=0,
        eval_seq_len=32,
        final_eval_windows=2,
        corpus=str(corpus),
    )
    run_, meta = tr.make_run(str(teacher_dir), str(teacher_dir), None, cfg, tmp_path / "mv")
    pruner = MovementPruner(run_.student, 0.5, cfg.steps, every=2)
    run_.hooks.append(pruner)
    summary = tr.distill(run_, cfg, save_meta=meta)
    assert summary["after"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    model, _ = tinyllm.load(tmp_path / "mv" / "model")
    assert sparsity_of(model) == pytest.approx(0.5, abs=0.01)
    info = (tmp_path / "mv" / "model" / "tinyllm.json").read_text()
    assert '"sparse"' in info and "model.layers.0.mlp.up_proj.weight" in info


def test_imp_with_rewinding_through_the_cli(teacher_dir, tmp_path) -> None:
    import json

    out = tmp_path / "imp"
    args = ["prune", str(teacher_dir), "--method", "imp", "--sparsity", "0.5", "--rounds", "2"]
    p = run(*args, "--steps", "2", "--rewind", "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert str(out / "model") in p.stdout.replace("\n", "")
    assert (out / "round-2" / "model" / "tinyllm.json").is_file()  # every round keeps its model
    first = json.loads((out / "round-1" / "summary.json").read_text())
    last = json.loads((out / "round-2" / "summary.json").read_text())
    assert first["after"]["sparsity"] == pytest.approx(1 - 0.5**0.5, abs=0.01)
    assert last["after"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert_clean_error(run(*args[:5], "0", "-o", str(tmp_path / "x")), "--sparsity")
