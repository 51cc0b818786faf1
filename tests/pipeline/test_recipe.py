"""Recipe parsing: valid recipes become step configs; every mistake names its place and the fix."""

from __future__ import annotations

import pytest

from tinyllm.pipeline.recipe import (
    Distill,
    RecipeError,
    Recover,
    builtin_recipes,
    load_recipe,
    parse_recipe,
)
from tinyllm.prune.wanda import Wanda
from tinyllm.quant.awq import AWQ
from tinyllm.quant.gptq import GPTQ

GOOD = """\
model: smollm2-135m
calibration: {samples: 16, seq_len: 64}
stages:
  - {type: distill, layers: 15, steps: 10}
  - {type: wanda, sparsity: 0.3}
  - {type: recover, steps: 5}
  - type: awq
    base: {type: gptq, bits: 4, group_size: 32, sym: true}
export:
  - {format: gguf, type: q4_0}
"""


def test_a_recipe_becomes_the_api_step_configs() -> None:
    r = parse_recipe(GOOD, "good.yaml")
    assert [type(s) for s in r.stages] == [Distill, Wanda, Recover, AWQ]
    assert r.stages[0].layers == 15 and r.stages[1].sparsity == 0.3
    assert r.stages[2].beta == 1.0  # recover = KD + task by default
    assert isinstance(r.stages[3].base, GPTQ) and r.stages[3].base.sym
    assert r.calibration.samples == 16 and r.evaluation.windows == 40
    assert r.exports[0].type == "q4_0" and r.warnings == []
    norm = r.normalized()
    assert norm["stages"][3]["type"] == "awq" and norm["stages"][3]["base"]["group_size"] == 32


def _error(text: str) -> str:
    """The RecipeError message parsing `text` (as r.yaml) raises (test_recipe_hostile too)."""
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml")
    return str(info.value)


def test_yaml_syntax_error_names_the_line() -> None:
    msg = _error("model: smollm2-135m\nstages:\n  - {type: wanda, sparsity: 0.3\n")
    assert msg.startswith("r.yaml, line 4") and "not valid YAML" in msg


def test_unknown_stage_type_lists_the_allowed_ones() -> None:
    msg = _error("model: m\nstages:\n  - {type: wandaa, sparsity: 0.3}\n")
    assert "line 3" in msg and "stage 1" in msg and "unknown stage type 'wandaa'" in msg
    assert "wanda" in msg.split("allowed:")[1] and "gptq" in msg


def test_wrong_field_type_names_stage_field_and_line() -> None:
    text = "model: m\nstages:\n  - {type: wanda, sparsity: 0.3}\n  - type: gptq\n    bits: four\n"
    msg = _error(text)
    assert msg.startswith("r.yaml, line 5, stage 2, field bits"), msg
    assert "'four'" in msg


def test_unknown_field_lists_the_allowed_fields() -> None:
    msg = _error("model: m\nstages:\n  - {type: rtn, bitz: 4}\n")
    assert "stage 1" in msg and "unknown field 'bitz'" in msg and "bits" in msg.split("allowed:")[1]


def test_impossible_orders_are_refused_with_the_recommended_order() -> None:
    msg = _error("model: m\nstages:\n  - {type: rtn}\n  - {type: wanda}\n")
    assert "stage 2" in msg and "distill -> prune -> quantize" in msg
    assert "quantizes them once" in _error("model: m\nstages:\n  - {type: rtn}\n  - {type: gptq}\n")
    msg = _error("model: m\nstages:\n  - {type: export, format: gguf}\n")
    assert "export is not a stage" in msg
    assert "needs `model:`" in _error("stages:\n  - {type: rtn}\n")
    assert "unknown section 'stagez'" in _error("model: m\nstagez: []\n")


def test_orders_known_to_hurt_warn() -> None:
    r = parse_recipe("model: m\nstages:\n  - {type: wanda}\n  - {type: distill, layers: 2}\n")
    assert len(r.warnings) == 1 and "distill -> prune -> quantize" in r.warnings[0]


def test_builtin_recipes_parse_and_missing_files_are_explained() -> None:
    names = builtin_recipes()
    assert {"cloud", "edge", "realtime", "mobile"} <= set(names)
    for name in names:
        assert load_recipe(name).stages
    with pytest.raises(RecipeError, match="built-in recipe: cloud"):
        load_recipe("no-such-recipe.yaml")


def test_issue9_stage_types_and_nested_bases() -> None:
    from tinyllm.quant.mixed import Mixed
    from tinyllm.quant.smoothquant import SmoothQuant

    text = """\
model: smollm2-135m
stages:
  - type: mixed
    avg_bits: 3.5
    base: {type: awq, base: {type: gptq, group_size: 64}}
"""
    r = parse_recipe(text, "m.yaml")
    assert isinstance(r.stages[0], Mixed) and isinstance(r.stages[0].base, AWQ)
    assert isinstance(r.stages[0].base.base, GPTQ) and r.stages[0].base.base.group_size == 64
    sq = parse_recipe(
        "model: m\nstages:\n  - {type: smoothquant, alpha: 0.6, activations: dynamic}\n", "s.yaml"
    )
    assert isinstance(sq.stages[0], SmoothQuant) and sq.stages[0].alpha == 0.6
    bad = "model: m\nstages:\n  - {type: mixed, avg_bits: 3.5, base: {type: nf4}}\n"
    assert "base must be one of rtn, gptq, awq" in _error(bad)
    assert "alpha must be in" in _error("model: m\nstages:\n  - {type: smoothquant, alpha: 2}\n")
