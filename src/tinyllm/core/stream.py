"""Streaming compression: a model that is never whole in memory, written in shards as it goes.

`compress` takes this path for a Hugging Face safetensors model when streaming is asked for
(or, with `stream="auto"`, when the model's float32 weights would not fit comfortably in
memory) and every step is one that works block by block (registry.STREAMS). The model is a
skeleton (models.lazy): the input embeddings and the norms are read (the embeddings in their
stored dtype, their output taken in float32), the blocks are read one at a time by
`core.placement.Streaming` while the steps calibrate them, and the checkpoint is written
one shard per block plus one for the rest, with Hugging Face's index, in tinyllm's format:
`tinyllm.load` reads it back like any checkpoint, one shard at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tinyllm.checkpoint import (
    TINYLLM_CONFIG,
    checked_parts,
    checkpoint_info,
    checkpoint_tensors,
    compact,
    fill_from_tensors,
    finish_checkpoint,
    open_lazy_checkpoint,
    round_floats,
    shard_name,
    write_index,
)
from tinyllm.core.placement import Streaming, unpack_block
from tinyllm.errors import ModelLoadError
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.models.anatomy import find_blocks
from tinyllm.models.lazy import LazyWeights, materialize, release, skeleton
from tinyllm.models.load import checked_hf_dir
from tinyllm.util.fs import atomic_dir
from tinyllm.util.memory import available_bytes, trim_heap

log = logging.getLogger(__name__)

# stream="auto" streams when the float32 weights exceed this share of the memory available now
AUTO_SHARE = 0.5


def open_streamed(directory: Path) -> tuple[nn.Module, Any, LazyWeights, bool]:
    """A Hugging Face directory (or a float tinyllm checkpoint) as a skeleton whose non-block
    tensors (embeddings, norms) are read, the head left on disk unless tied.
    -> (model, tokenizer, weights, tied embeddings)"""
    weights: LazyWeights
    if (directory / TINYLLM_CONFIG).is_file():  # a float or pruned tinyllm checkpoint
        config, tokenizer, weights = open_lazy_checkpoint(directory)
    else:
        config, tokenizer = checked_hf_dir(directory)
        weights = LazyWeights(directory)
    model = skeleton(config)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    head_key = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)
    # tied: one tensor (as built), or a checkpoint that stores no head (it reuses the table)
    tied = head is not None and (head.weight is emb.weight or head_key not in weights)
    prefix, _ = find_blocks(model)
    for name, module in model.named_children():
        _materialize_rest(module, name, prefix, weights, head)
    if tied:
        head.weight = emb.weight
    if emb.weight.dtype != torch.float32:  # hidden states, masks, rotary tables in float32
        emb.register_forward_hook(lambda _m, _a, out: out.float())
    return model, tokenizer, weights, tied


def _materialize_rest(
    module: nn.Module, name: str, blocks: str, weights: LazyWeights, head: nn.Module | None
) -> None:
    """Read the tensors of `module` (at `name`) except the blocks and the head, as stored."""
    if module is head or name == blocks:
        return
    if any(True for _ in module.children()) and blocks.startswith(name + "."):
        for child_name, child in module.named_children():
            _materialize_rest(child, f"{name}.{child_name}", blocks, weights, head)
        return
    materialize(module, name, weights, None)


class BlockReader:
    """A model directory (a tinyllm checkpoint, packed or not, or a Hugging Face one) read one
    decoder block at a time, for work that visits each block once (a streamed GGUF export):
    `model` is the skeleton with everything outside the blocks read as stored (embeddings,
    norms, the head), `enter(i)` reads block i (packed records swapped in, large float tensors
    as stored), `leave(i)` gives it back. Peak memory: the tables and one block."""

    def __init__(self, directory: Path, verify: bool = True) -> None:
        directory = Path(directory)
        if (directory / TINYLLM_CONFIG).is_file():
            self.info, config, self.tokenizer = checked_parts(directory, verify)
        else:
            config, self.tokenizer = checked_hf_dir(directory)
            self.info = {"quantized": {}}
        self.weights = LazyWeights(directory)
        self.model = skeleton(config)
        self.prefix, self.blocks = find_blocks(self.model)
        self.records: dict[str, QuantizedWeight] = {}  # the tables' (a tied head shares one)
        keys = self.weights.keys()
        self.block_keys: list[list[str]] = [[] for _ in self.blocks]
        for k in keys:
            if k.startswith(self.prefix + "."):
                self.block_keys[int(k[len(self.prefix) + 1 :].split(".")[0])].append(k)
        self._fill([k for k in keys if not k.startswith(self.prefix + ".")], self.records)
        if self._unread():  # a tied head is not stored: it is the table
            self.model.tie_weights()
        if self._unread():
            raise ModelLoadError(f"{directory}: does not match its config ({self._unread()[:2]})")

    def _unread(self) -> list[str]:
        """Tensors outside the blocks still on the meta device."""
        state = self.model.state_dict(keep_vars=True)
        return [k for k, t in state.items() if t.is_meta and not k.startswith(self.prefix + ".")]

    def _fill(self, keys: list[str], records: dict[str, QuantizedWeight]) -> None:
        tensors = {k: self.weights.get(k) for k in keys}
        fill_from_tensors(self.model, tensors, self.info, records, None)

    def enter(self, i: int) -> nn.Module:
        self._fill(self.block_keys[i], {})
        return self.blocks[i]

    def leave(self, i: int) -> None:
        unpack_block(self.blocks[i])
        release(self.blocks[i])
        trim_heap()


def should_stream(directory: Path, mode: str) -> bool:
    """'on', 'off', or 'auto': stream when the float32 weights exceed AUTO_SHARE of the memory
    available now."""
    if mode != "auto":
        return mode == "on"
    weights = LazyWeights(directory)
    numel = sum(weights.numel(k) for k in weights.entries)  # a sparse layer: its parts
    return 4 * numel > AUTO_SHARE * available_bytes()


def save_streamed(
    model: nn.Module,
    tokenizer: Any,
    where: Streaming,
    out: Path,
    meta: dict[str, Any],
    extra_files: dict[str, Any],
    float_dtype: torch.dtype,
    tied: bool,
) -> Path:
    """Write the streamed model as a sharded tinyllm checkpoint: one shard per block (read back
    from where the steps left it, floats rounded to `float_dtype`), one for the rest."""
    prefix, blocks = find_blocks(model)
    n = len(blocks) + 1
    quantized: dict[str, dict] = {}
    sparse: dict[str, tuple[int, int]] = {}
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_dir(out) as tmp:
        for i, block in enumerate(blocks):
            where.enter(i, block)
            round_floats(block, float_dtype)
            tensors, q, s = checkpoint_tensors(model, f"{prefix}.{i}")
            quantized.update(q)
            sparse.update(s)
            total += _write_shard(tmp, i + 1, n, tensors, weight_map)
            unpack_block(block)
            release(block)
            trim_heap()
        rest = _rest_tensors(model, where.weights, prefix, float_dtype, tied)
        total += _write_shard(tmp, n, n, rest, weight_map)
        write_index(tmp, weight_map, total)
        finish_checkpoint(
            tmp, model, tokenizer, checkpoint_info(quantized, sparse, tied, meta), extra_files
        )
    return out


def _write_shard(
    tmp: Path, k: int, n: int, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]
) -> int:
    """Write shard k of n; -> its tensor bytes."""
    name = shard_name(k, n)
    save_file(
        {key: t.cpu().contiguous() for key, t in tensors.items()},
        str(tmp / name),
        metadata={"format": "pt"},
    )
    weight_map.update(dict.fromkeys(tensors, name))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _rest_tensors(
    model: nn.Module, weights: LazyWeights, prefix: str, float_dtype: torch.dtype, tied: bool
) -> dict[str, torch.Tensor]:
    """The tensors outside the blocks (the head read from the source now, skipped when tied),
    float32 ones rounded to `float_dtype`, each stored compactly."""
    head = model.get_output_embeddings()
    head_key = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)
    out = {}
    for key, t in model.state_dict().items():
        if key.startswith(prefix + ".") or (tied and key == head_key):
            continue
        value = weights.get(key) if t.device.type == "meta" else t.detach()
        if value.dtype == torch.float32:
            value = value.to(float_dtype).float()
        out[key] = compact(value.contiguous())
    return out
