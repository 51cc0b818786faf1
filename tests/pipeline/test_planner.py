"""The planner on a tiny model: sensitivities, exact sizes, predictions, the front, the CLI."""

from __future__ import annotations

import struct

import pytest
import torch

import tinyllm
from tests.conftest import tiny_model
from tests.test_cli import assert_clean_error, run
from tinyllm.checkpoint import round_floats
from tinyllm.errors import ConfigError
from tinyllm.pipeline.planner import (
    Candidate,
    Grid,
    candidate_grids,
    layer_sensitivity,
    model_bytes,
    pareto,
    parse_size,
    predict,
)
from tinyllm.pipeline.recipe import load_recipe


def test_sensitivity_per_layer_and_predictions_fall_with_bits() -> None:
    model = tiny_model()
    windows = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    sens = layer_sensitivity(model, windows)
    assert len(sens) == 14 and all(v >= 0 for v in sens.values()) and max(sens.values()) > 0
    cands, _ = predict(model, sens, [Grid(b, 32, False) for b in (2, 3, 4, 8)])
    klds = [c.predicted_kld for c in cands]
    assert klds == sorted(klds, reverse=True) and klds[-1] < 0.01 * klds[0]
    sizes = [c.size_bytes for c in cands]
    assert sizes == sorted(sizes)
    # the model is unchanged afterwards
    torch.testing.assert_close(model(windows).logits, tiny_model()(windows).logits)


@pytest.mark.parametrize("grid", [Grid(4, 32, True), Grid(3, 64, False), Grid(8, -1, True)])
def test_predicted_size_is_the_checkpoint_size(grid, tmp_path, tokenizer) -> None:
    model = tiny_model(vocab=len(tokenizer))
    expected = model_bytes(model, grid)
    tinyllm.quantize(model, tinyllm.RTN(bits=grid.bits, group_size=grid.group_size, sym=grid.sym))
    round_floats(model, torch.float16)  # as every tinyllm command does before saving
    tinyllm.save_checkpoint(model, tokenizer, tmp_path / "q", {"steps": []})
    data = (tmp_path / "q" / "model.safetensors").read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    assert len(data) - header == expected


@pytest.mark.parametrize("grid", [Grid(3, 32, False), Grid(4, -1, True), Grid(5, 64, False)])
def test_weight_error_is_the_rtn_error(grid) -> None:
    from tinyllm.pipeline.planner import weight_error
    from tinyllm.quant.rtn import RTN, rtn_quantize

    w = torch.randn(24, 128)
    q = rtn_quantize(w, RTN(bits=grid.bits, group_size=grid.group_size, sym=grid.sym))
    assert weight_error(w, grid) == pytest.approx(
        float((q.dequantize() - w).pow(2).sum()), rel=1e-5
    )


def test_pareto_front_and_sizes() -> None:
    c = [
        Candidate(Grid(b, 32, False), size, kld)
        for b, size, kld in [(2, 10, 1.0), (3, 20, 0.5), (4, 30, 0.6), (5, 40, 0.1)]
    ]
    assert [x.grid.bits for x in pareto(c)] == [2, 3, 5]
    assert parse_size("90MB", 1000) == 90_000_000 and parse_size("2MiB", 1) == 2 * 2**20
    assert parse_size("0.35x", 1000) == 350 and parse_size("1234", 1) == 1234
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("big", 1)
    assert len(candidate_grids()) == 40


def test_embedding_options_are_measured_and_sized(tmp_path, tokenizer) -> None:
    from tinyllm.pipeline.planner import embedding_sensitivity
    from tinyllm.quant.embed import embed_step

    model = tiny_model(vocab=len(tokenizer))
    windows = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    emb = embedding_sensitivity(model, windows)
    assert set(emb) == {8, 4} and 0 <= emb[8] < emb[4]
    grid = Grid(4, 32, True)
    cands, _ = predict(model, layer_sensitivity(model, windows), [grid], emb)
    assert [c.embed_bits for c in cands] == [None, 8, 4]
    assert cands[0].size_bytes > cands[1].size_bytes > cands[2].size_bytes
    assert cands[2].predicted_kld > cands[0].predicted_kld
    tinyllm.quantize(model, tinyllm.RTN(bits=4, group_size=32, sym=True))
    tinyllm.quantize(model, embed_step(8))
    round_floats(model, torch.float16)
    tinyllm.save_checkpoint(model, tokenizer, tmp_path / "q", {"steps": []})
    data = (tmp_path / "q" / "model.safetensors").read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    assert len(data) - header == model_bytes(tiny_model(vocab=len(tokenizer)), grid, 8)


def test_cli_plan_recommends_a_runnable_recipe(tiny_dir, corpus_file, tmp_path) -> None:
    out = tmp_path / "plan"
    common = ["--calib-corpus", str(corpus_file), "--samples", "4", "--seq-len", "16"]
    common += ["--eval-corpus", str(corpus_file), "--eval-windows", "2", "--eval-seq-len", "16"]
    common += ["--probe-seq-len", "16"]
    p = run(
        "plan", str(tiny_dir), "--max-size", "0.5x", "--verify-top", "2", "-o", str(out), *common
    )
    assert p.returncode == 0, p.stderr
    assert "recommended" in p.stdout and (out / "front.png").stat().st_size > 1000
    recipe = load_recipe(out / "recommended.yaml")
    import json

    plan = json.loads((out / "plan.json").read_text())
    rec = plan["recommended"]
    assert rec["size_bytes"] <= plan["budget"]["max_size_bytes"]
    if rec["layer_bits"] is not None:  # a mixed-precision candidate won: replayed exactly
        assert recipe.stages[0].allocation == rec["layer_bits"]
        assert recipe.stages[0].base.group_size == rec["grid"]["group_size"]
    else:
        assert recipe.stages[0].bits == rec["grid"]["bits"]
    assert sum(c["measured"] is not None for c in plan["candidates"]) == 2
    assert (out / "sensitivity.json").is_file()  # a re-run with another budget reuses it
    p = run("plan", str(tiny_dir), "--max-size", "1KB", "-o", str(tmp_path / "x"), *common)
    assert_clean_error(p, "no candidate fits")
    p = run("plan", str(tiny_dir), "--max-size", "huge", "-o", str(tmp_path / "y"), *common)
    assert_clean_error(p, "not a size")


def test_mixed_candidates_fill_the_budget_and_beat_uniform() -> None:
    from tinyllm.pipeline.planner import Budget, candidate_step, fits, mixed_candidates

    model = tiny_model()
    windows = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    sens = layer_sensitivity(model, windows)
    grids = [Grid(b, 32, False) for b in (2, 3, 4, 5, 8)]
    uniform, costs = predict(model, sens, grids)
    budget = Budget((uniform[1].size_bytes + uniform[2].size_bytes) // 2)  # between 3 and 4 bits
    mixed = mixed_candidates(model, costs, budget)
    assert len(mixed) == 1  # group 32 asymmetric is the only grid family predicted
    m = mixed[0]
    assert fits(m, budget) and m.size_bytes > uniform[1].size_bytes
    assert m.predicted_kld <= min(c.predicted_kld for c in uniform if fits(c, budget))
    assert 3 <= m.avg_bits <= 4 and m.label.startswith("mixed ") and len(m.layer_bits) == 14
    step = candidate_step(m)
    assert step.allocation == m.layer_bits and step.base.group_size == 32


def test_gguf_mix_candidates_fit_and_write_an_auto_export(tmp_path) -> None:
    """GGUF type mixes: types that tile each layer, the size budget met with the block linears
    in GGUF bytes, a mixed-over-types step, and a recipe that exports with --type auto."""
    from tinyllm.pipeline.planner import (
        Budget,
        Plan,
        candidate_step,
        fits,
        gguf_candidates,
        recipe_yaml,
    )
    from tinyllm.quant.common import gguf_bpw

    model = tiny_model()
    windows = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    sens = layer_sensitivity(model, windows)
    linears = {n: m for n, m in model.named_modules() if n in sens}
    q4 = model_bytes(model, Grid(4, 32, True))
    budget = Budget(q4 + sum(m.weight.numel() for m in linears.values()) // 4)  # ~ +2 bpw room
    (mix,) = gguf_candidates(model, sens, budget)
    assert fits(mix, budget) and mix.label.startswith("GGUF mix")
    assert set(mix.layer_bits) == set(sens) and set(mix.layer_bits.values()) <= {
        "q4_0", "q5_0", "q8_0"
    }  # 64-wide rows: no K type  # fmt: skip
    gguf_block = sum(linears[n].weight.numel() * gguf_bpw(t) / 8 for n, t in mix.layer_bits.items())
    q4_block = sum(m.weight.numel() * 4.5 / 8 for m in linears.values())
    assert gguf_block > q4_block  # the room is spent on wider types
    step = candidate_step(mix)
    assert step.types and step.allocation == mix.layer_bits
    plan = Plan("tiny", budget, {"fp16_bytes": 1}, sens)
    text = recipe_yaml(plan, mix, {"samples": 4})
    recipe = load_recipe_text(text, tmp_path)
    assert recipe.stages[0].types == step.types
    assert recipe.exports[0].type == "auto"


def load_recipe_text(text: str, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(path)
