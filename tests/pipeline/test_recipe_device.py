"""A recipe's top-level `device:`: spelling checked at parse time, the GPU when the run starts."""

from __future__ import annotations

import pytest
import torch

from tinyllm.pipeline.recipe import RecipeError, parse_recipe
from tinyllm.pipeline.runner import run_device

STAGES = "stages:\n  - {type: rtn, bits: 4}\n"


def _parse(device_line: str):
    return parse_recipe(f"model: m\n{device_line}{STAGES}", "r.yaml")


@pytest.mark.parametrize(
    ("line", "device"),
    [("", "auto"), ("device: cpu\n", "cpu"), ("device: CUDA:1\n", "cuda:1")],
)
def test_the_device_key_is_read_and_defaults_to_auto(line: str, device: str) -> None:
    recipe = _parse(line)
    assert recipe.device == device
    assert "device" not in recipe.normalized()  # a run may resume on another machine


@pytest.mark.parametrize("value", ["bogus", "gpu", "cuda:x", "3", "[cpu]"])
def test_a_misspelt_device_names_the_line_and_the_field(value: str) -> None:
    with pytest.raises(RecipeError, match=r"r\.yaml, line 2, field device: unknown device"):
        _parse(f"device: {value}\n")


def test_a_gpu_the_machine_lacks_is_refused_when_the_run_starts(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = _parse("device: cuda\n")  # valid on any machine: it may be meant for another
    with pytest.raises(RecipeError, match=r"r\.yaml, field device: device 'cuda' asked for, but"):
        run_device(recipe)
    assert run_device(_parse("device: auto\n")) == "cpu"
