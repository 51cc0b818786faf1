"""Fast fp32 inference linears on CPU through oneDNN.

PyTorch sends fp32 `nn.Linear` to MKL's sgemm, which takes a slow code path on AMD CPUs; oneDNN
with a weight pre-packed for the expected batch is 1.2-1.5x faster here on the shapes of small
LLMs (benchmarks/bench_kernels.py). `fast_linears(model)` swaps the model's fp32 linears for
packed ones for the duration of a block and restores the originals after, so the model a caller
holds is never changed. The packed copy costs the linears' weight bytes once more while active.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)


def onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


class OneDNNLinear(nn.Module):
    """Inference-only copy of an fp32 `nn.Linear` whose weight oneDNN has packed."""

    def __init__(self, linear: nn.Linear, batch_tokens: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_tokens)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _swappable(module: nn.Module) -> bool:
    """A plain fp32 nn.Linear holding its weight (not, say, one that compressed-tensors
    decompresses on the fly)."""
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and isinstance(weight, torch.Tensor)
        and weight.dtype == torch.float32
        and not module._forward_pre_hooks
    )


@contextlib.contextmanager
def fast_linears(model: nn.Module, batch_tokens: int | None = None) -> Iterator[nn.Module]:
    """Run the block with the model's fp32 linears on oneDNN; restore them afterwards."""
    if not onednn_available() or (torch.is_grad_enabled() and model.training):
        yield model
        return
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _swappable(child):
                    setattr(parent, name, OneDNNLinear(child, batch_tokens))
                    swapped.append((parent, name, child))
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
