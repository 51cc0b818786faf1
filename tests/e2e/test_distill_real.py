"""Distillation on the real model: a few steps of a 15-block student lower its perplexity, and the
saved student loads."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_fifteen_block_student_improves_in_a_few_steps(tmp_path) -> None:
    import tinyllm
    from tinyllm.distill import trainer as tr

    cfg = tr.DistillConfig(
        steps=4, lr=2e-4, beta=1.0, batch=2, seq_len=256, eval_every=0, final_eval_windows=4
    )
    run, meta = tr.make_run("smollm2-135m", None, 15, cfg, tmp_path / "s15")
    summary = tr.distill(run, cfg, save_meta=meta)
    assert summary["after"]["perplexity"] < 0.5 * summary["before"]["perplexity"]
    assert summary["after"]["kld"] < summary["before"]["kld"]
    assert 0 < summary["recovery"] < 1
    model, _ = tinyllm.load(tmp_path / "s15" / "model")
    assert model.config.num_hidden_layers == 15
