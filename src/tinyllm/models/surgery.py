"""Graph surgery that really shrinks a model: keep some decoder blocks, keep some rows or columns
of a linear layer. The config is rewritten by the callers so the result reloads as a standard
model of its family."""

from __future__ import annotations

import torch
from torch import nn

from tinyllm.models.anatomy import find_blocks


def keep_blocks(model: nn.Module, keep: list[int]) -> None:
    """Keep only the decoder blocks at `keep` (in order), in place; renumber KV-cache slots and
    rewrite `num_hidden_layers` and `layer_types`."""
    path, blocks = find_blocks(model)
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.ModuleList([blocks[i] for i in keep]))
    for new_index, block in enumerate(getattr(parent, child)):
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]


def slice_linear(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    """Keep output features `rows` and input features `cols` (index tensors), in place."""
    with torch.no_grad():
        w = linear.weight
        if rows is not None:
            w = w[rows]
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias[rows].clone())
        if cols is not None:
            w = w[:, cols]
        linear.weight = nn.Parameter(w.clone())
    linear.out_features, linear.in_features = linear.weight.shape
