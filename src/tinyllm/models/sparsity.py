"""How sparse a model is: the threshold at which a linear counts as pruned, and the achieved
fraction of zeros. Model facts, read by checkpoints, evaluation, distillation and the methods."""

from __future__ import annotations

import torch
from torch import nn

from tinyllm.models.anatomy import analyze

# A float linear with at least this fraction of exact zeros counts as pruned: checkpoints store
# it sparse and the trainer keeps its mask.
SPARSE_MIN = 0.05


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The float weight a linear computes with (dequantized for packed layers); None where the
    module holds no plain weight (e.g. compressed-tensors layers decompressed on the fly)."""
    get = getattr(module, "dequantized_weight", None)
    if get is not None:
        return get()
    w = getattr(module, "weight", None)
    return w.detach() if isinstance(w, torch.Tensor) else None


def sparsity_of(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over the linears of the decoder blocks (those whose weight
    can be read)."""
    zeros = total = 0
    for s in analyze(model).linears:
        w = linear_weight(s.module)
        if w is None:
            continue
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0
