"""Hostile recipes: duplicate keys, alias bombs, deep nesting, wrong types: one clear error each."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.pipeline.test_recipe import _error
from tinyllm.pipeline.recipe import RecipeError, load_recipe, parse_recipe
from tinyllm.util import safe_yaml


def test_duplicate_keys_name_both_lines() -> None:
    msg = _error("model: m\nstages:\n  - type: gptq\n    bits: 4\n    bits: 3\n")
    assert msg == "r.yaml, line 5: duplicate key 'bits' (first on line 4); keep only one"
    assert "duplicate key 'model'" in _error("model: a\nmodel: b\nstages: []\n")
    assert "duplicate key 'bits'" in _error("model: m\nstages: [{type: rtn, bits: 4, bits: 3}]\n")
    plain = yaml.safe_load("model: a\nmodel: b\n")  # what PyYAML alone does: keeps the last
    assert plain == {"model": "b"}


def _laughs(levels: int, width: int = 9) -> str:
    """The billion laughs: each level an anchored list of `width` aliases to the previous one."""
    lines = ["model: m", "stages:", '  - &l0 {type: rtn, note: "lol"}']
    for i in range(1, levels + 1):
        lines.append(f"  - &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_quickly() -> None:
    text = _laughs(9)  # 9**9 = 387 million stage mappings once expanded
    assert len(text) < 1000
    t0 = time.perf_counter()
    msg = _error(text)
    assert time.perf_counter() - t0 < 1.0
    assert "expands to more than 100000 values" in msg and "write the values out" in msg
    assert msg.startswith("r.yaml, line 4:")  # the first alias
    assert "contains itself" in _error("model: m\nstages: &s [*s]\n")


def test_small_aliases_and_merge_keys_still_work() -> None:
    text = (
        "model: m\n"
        "calibration: &data {corpus: wiki.txt, seq_len: 64}\n"
        "evaluation: {<<: *data, windows: 2}\n"
        "stages: [{type: rtn}]\n"
    )
    r = parse_recipe(text, "r.yaml")
    assert r.evaluation.corpus == "wiki.txt" and r.evaluation.seq_len == 64
    assert r.evaluation.windows == 2 and r.calibration.corpus == "wiki.txt"


@pytest.mark.parametrize("levels", [40, 200_000])
def test_deep_nesting_is_refused_without_recursion_error(levels: int) -> None:
    text = "model: m\nstages: " + "[" * levels + "]" * levels + "\n"
    msg = _error(text)
    assert msg.startswith("r.yaml, line 2: nested deeper than 32 levels"), msg[:200]


def test_deep_nesting_through_aliases_is_refused() -> None:
    chain = ["model: m", "a0: &a0 " + "[" * 20 + "1" + "]" * 20]
    chain += [f"a{i}: &a{i} " + "[" * 10 + f"*a{i - 1}" + "]" * 10 for i in range(1, 4)]
    with pytest.raises(safe_yaml.RefusedYAML, match="aliases expanded"):
        safe_yaml.load("\n".join(chain) + "\n")


def test_keys_are_names_and_content_never_runs() -> None:
    assert "key '1' is not a name" in _error("model: m\nstages: [{type: rtn, 1: 2}]\n")
    assert "key 'on' is not a name" in _error("model: m\nstages: [{type: rtn, on: 2}]\n")
    assert "not a list or mapping" in _error("model: m\n? [a, b]\n: 1\n")
    assert "`type:` is a name" in _error("model: m\nstages: [{type: [rtn]}]\n")
    msg = _error("model: !!python/object/apply:os.system ['touch /tmp/pwned']\nstages: []\n")
    assert "not valid YAML" in msg and "could not determine a constructor" in msg


def test_strict_types_name_the_stage_and_field() -> None:
    msg = _error('model: m\nstages:\n  - {type: wanda}\n  - {type: gptq, bits: "4"}\n')
    assert msg.startswith("r.yaml, line 4, stage 2, field bits: Input should be a valid integer")
    assert "(got '4')" in msg and "without quotes" in msg
    msg = _error("model: m\nstages: [{type: rtn, bits: 4.5}]\n")
    assert "stage 1, field bits" in msg and "whole number" in msg
    assert "field bits" in _error("model: m\nstages: [{type: rtn, bits: 4.0}]\n")
    assert "field sym" in _error('model: m\nstages: [{type: rtn, sym: "true"}]\n')
    msg = _error('model: m\nstages: [{type: awq, base: {bits: "4"}}]\n')
    assert msg.startswith("r.yaml, line 2, stage 1, field base.bits: Input should be a valid int")
    msg = _error('model: m\ncalibration: {samples: "16"}\nstages: []\n')
    assert msg.startswith("r.yaml, line 2, field calibration.samples: Input should be a valid int")
    assert "in quotes" in _error("model: m\ncalibration: {corpus: 123}\nstages: []\n")
    assert "not a usable number" in _error("model: m\nstages: [{type: gptq, damp: .nan}]\n")
    assert "not a usable number" in _error("model: m\nstages: [{type: wanda, sparsity: .inf}]\n")


def test_strict_keeps_what_yaml_users_write() -> None:
    r = parse_recipe(
        "model: m\nstages:\n  - {type: wanda, pattern: 2:4}\n"
        "  - {type: gptq, damp: 1, bits: 4}\n  - {type: recover, lr: 1e-3, steps: 5}\n"
    )
    wanda, gptq, recover = r.stages
    assert wanda.pattern == "2:4"  # YAML 1.1 would read 124 (base 60)
    assert gptq.damp == 1.0 and isinstance(gptq.damp, float)  # an int for a float is fine
    assert recover.lr == pytest.approx(1e-3)  # YAML 1.1 would read the string "1e-3"


def test_recipe_files_that_are_not_text_or_too_big(tmp_path: Path) -> None:
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"model: m\nstages: []\n# \xff\xfe\n")
    with pytest.raises(RecipeError, match=r"not UTF-8 text \(byte offset 22\)"):
        load_recipe(binary)
    big = tmp_path / "big.yaml"
    big.write_text("model: m\n" + "#" * (2 << 20) + "\n")
    with pytest.raises(RecipeError, match="larger than 1024 KiB"):
        load_recipe(big)
