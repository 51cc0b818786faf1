"""Parameter counts, bytes in memory and bits per weight of the linear layers."""

from __future__ import annotations

from torch import nn

from tinyllm.models.anatomy import Anatomy


def _unique_tensors(model: nn.Module) -> list:
    seen: set[int] = set()
    out = []
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def param_count(model: nn.Module) -> int:
    """Parameters, tied ones counted once; packed quantized layers count their logical weights."""
    seen: set[int] = set()
    total = 0
    for mod in model.modules():
        logical = getattr(mod, "logical_numel", None)
        record = getattr(mod, "qweight", None)
        if logical is not None and id(record) not in seen:  # a tied head shares its record
            if record is not None:
                seen.add(id(record))
            total += logical()
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers in memory, shared storage counted once."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def linear_storage_bits(module: nn.Module) -> int:
    """Bits that hold a linear layer's weight: packed data plus scales for quantized layers."""
    bits = getattr(module, "weight_storage_bits", None)
    if bits is not None:
        return int(bits())
    return module.weight.numel() * module.weight.element_size() * 8


def bits_per_weight(anatomy: Anatomy) -> float:
    """Average storage bits per weight over the linear layers of the decoder blocks."""
    total = sum(linear_storage_bits(s.module) for s in anatomy.linears)
    return total / anatomy.num_linear_weights
