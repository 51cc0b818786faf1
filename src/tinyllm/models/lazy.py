"""Lazy models: a safetensors checkpoint read tensor by tensor, and a skeleton without weights.

Streaming compression (core/placement.py) never holds the whole model: the skeleton has every
module, its parameters on the meta device (shapes, no memory) and its buffers real (rotary
tables are computed, not stored), and `LazyWeights.get` reads one tensor from disk when a block
needs it. Tensors are read with plain file reads into fresh memory, not through a memory map: a
mapped file's pages count in the process's resident size while the mapping lives, so reading a
16 GB checkpoint through one would show 16 GB of RSS for a job that holds one block.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyllm.errors import ModelLoadError
from tinyllm.models.validate import read_header

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LazyWeights:
    """The tensors of a directory's *.safetensors files (one file or Hugging Face shards), read
    on demand. -> get(name) reads one tensor."""

    def __init__(self, directory: Path, files: list[Path] | None = None) -> None:
        self.directory = Path(directory)
        self.entries: dict[str, tuple[Path, dict[str, Any], int]] = {}
        files = sorted(self.directory.glob("*.safetensors")) if files is None else files
        if not files:
            raise ModelLoadError(f"{directory} has no *.safetensors weights to stream from")
        for f in files:
            with open(f, "rb") as fh:
                start = 8 + int.from_bytes(fh.read(8), "little")
            for key, entry in read_header(f).items():
                if key != "__metadata__":
                    self.entries[key] = (f, entry, start)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def numel(self, name: str) -> int:
        n = 1
        for d in self.entries[name][1]["shape"]:
            n *= int(d)
        return n

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.entries[name][1]["dtype"]]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name` in fresh memory (converted to `dtype` when given)."""
        if name not in self.entries:
            raise ModelLoadError(f"{self.directory}: no tensor '{name}' in its safetensors files")
        path, entry, start = self.entries[name]
        lo, hi = entry["data_offsets"]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ModelLoadError(f"{path}: tensor '{name}' has unsupported dtype {entry['dtype']}")
        buf = bytearray(hi - lo)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [buf], start + lo)
        finally:
            os.close(fd)
        if got != hi - lo:
            raise ModelLoadError(f"{path} is truncated: tensor '{name}' is incomplete")
        stored = SAFETENSORS_DTYPES[entry["dtype"]]
        t = torch.frombuffer(buf, dtype=stored) if buf else torch.empty(0, dtype=stored)
        t = t.reshape(entry["shape"])
        return t if dtype is None or dtype == stored else t.to(dtype)


def read_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, each in its own fresh memory (no file mapping stays
    behind: a tensor kept from a mapped file would keep the whole file resident)."""
    weights = LazyWeights(Path(path).parent, [Path(path)])
    return {k: weights.get(k) for k in weights.entries}


def skeleton(config: Any) -> nn.Module:
    """The model `config` describes with its parameters on the meta device and its buffers real
    (rotary frequencies are computed at construction and never stored), tied weights tied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for configs it cannot build
        kind = getattr(config, "model_type", "?")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot build a '{kind}' causal language model: {first}") from exc
    return model.eval()


def materialize(
    module: nn.Module,
    prefix: str,
    weights: LazyWeights,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
) -> None:
    """Fill the module's meta parameters and persistent buffers from `weights` (keys
    `prefix.<name>`), converted to `dtype` where they are floating point (None: as stored)."""
    state = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if t.device.type != "meta":
            continue
        key = f"{prefix}.{name}" if prefix else name
        value = weights.get(key, dtype if dtype is not None and t.is_floating_point() else None)
        if tuple(value.shape) != tuple(t.shape):
            raise ModelLoadError(
                f"{weights.directory}: '{key}' has shape {list(value.shape)}, the config "
                f"implies {list(t.shape)}"
            )
        state[name] = value.to(device)
    if state:
        module.load_state_dict(state, strict=False, assign=True)


def release(module: nn.Module) -> None:
    """Give back the memory of the module's tensors: they become meta tensors of the same shapes."""
    module.to("meta")


def compute_in_float32(model: nn.Module) -> int:
    """Embeddings and linears kept in a narrower float dtype (bf16/fp16, to halve the memory of
    a large vocabulary's tables) take and give float32, so the rest of the model computes as it
    would with float32 weights. -> the number of modules adapted"""
    n = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dtype == torch.float32:
            continue
        if isinstance(mod, nn.Linear):
            mod.register_forward_pre_hook(_input_to_weight_dtype)
        elif not isinstance(mod, nn.Embedding):
            continue
        mod.register_forward_hook(_output_to_float32)
        n += 1
    return n


def _input_to_weight_dtype(mod: nn.Module, args: tuple) -> tuple:
    return (args[0].to(mod.weight.dtype), *args[1:])


def _output_to_float32(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.float()


def float32_bytes(directory: Path) -> int:
    """What the float tensors of a directory's safetensors files (packed records excluded) would
    take in float32, from the headers alone."""
    weights = LazyWeights(directory)
    return sum(
        4 * weights.numel(k)
        for k in weights.entries
        if weights.dtype(k).is_floating_point and ".record." not in k
    )
