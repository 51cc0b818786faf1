"""Activation offload (core.placement.HostActivations): calibration activations kept in CPU
memory while blocks compute elsewhere give the same checkpoint, in memory and streamed, for
every calibrated method. Reads are copies on the CPU as on a GPU, so a method that changed a
read item in place (lost on a GPU) fails here too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from tinyllm.core.compress import Calibration, compress
from tinyllm.core.placement import HostActivations, Placement
from tinyllm.core.registry import STREAMS, step_class
from tinyllm.errors import ConfigError

SETTINGS = {"gptq": {"bits": 4, "group_size": 32}, "awq": {}, "sparsegpt": {"sparsity": 0.5}}
SETTINGS |= {"wanda": {"sparsity": 0.5}, "smoothquant": {}, "channels": {"ratio": 0.25}}
SETTINGS |= {"int8-static": {}, "blocks": {"count": 1}}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def src(tmp_path: Path, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", vocab=len(tokenizer))
    torch.manual_seed(4)
    out = tmp_path / "src"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_host_activations_copy_on_read_and_store_on_the_host() -> None:
    xs = HostActivations([torch.ones(2, 3), torch.zeros(2, 3)], torch.device("cpu"))
    read = xs[0]
    read.add_(1)  # a copy: the stored item is unchanged
    assert torch.equal(xs[0], torch.ones(2, 3))
    xs[1] = read
    assert torch.equal(xs[1], torch.full((2, 3), 2.0))
    xs[:] = [torch.zeros(1), torch.ones(1)]
    assert [float(x) for x in xs] == [0.0, 1.0] and len(xs[:]) == 2
    assert all(t.device.type == "cpu" for t in list.__iter__(xs))


def test_auto_offloads_only_where_there_is_a_device_to_spare() -> None:
    assert not Placement("cpu").offloads(1 << 40)  # the CPU is the host
    assert Placement("cpu", "on").offloads(1)
    assert not Placement("cpu", "off").offloads(1 << 40)


@pytest.mark.parametrize("stream", ["off", "on"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_offloaded_activations_give_the_same_checkpoint(
    name: str, stream: str, src: Path, tmp_path: Path, corpus: Path
) -> None:
    assert name in STREAMS
    calib = Calibration(corpus=str(corpus), samples=8, seq_len=64)
    step = step_class(name)(**SETTINGS[name])
    plain = compress(src, [step], calib, tmp_path / "plain", stream=stream, offload="off")
    offl = compress(src, [step], calib, tmp_path / "offl", stream=stream, offload="on")
    a, b = _tensors(plain.out), _tensors(offl.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_offload_is_refused(src: Path, tmp_path: Path, corpus: Path) -> None:
    calib = Calibration(corpus=str(corpus), samples=2, seq_len=32)
    step = step_class("rtn")(bits=4, group_size=32)
    with pytest.raises(ConfigError, match="offload"):
        compress(src, [step], calib, tmp_path / "x", offload="sometimes")
