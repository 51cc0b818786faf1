"""`QuantLinear`: a linear layer whose weight stays packed in memory, with real kernels.

Each layer runs one packed layout (kernels/layouts.py): the first of `LAYOUTS` that supports its
`QuantizedWeight` on its device (tinyllm's C++ GEMVs for 4-bit groupwise and 8-bit per-row
records when they build, then PyTorch's packed CPU kernels, then dequantize-and-matmul).
`ActQuantLinear` runs one of `ACT_LAYOUTS` (integer W8A8 GEMM, simulated FP8). The
QuantizedWeight record is kept as buffers too (checkpoints are written from it), so memory
accounting sees both it and the layout's copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tinyllm.kernels.actquant import ActivationQuant
from tinyllm.kernels.layouts import (
    ActLayout,
    Layout,
    Packed,
    Target,
    choose_act_layout,
    choose_layout,
    layout_named,
)
from tinyllm.kernels.qweight import QuantizedWeight

TensorFn = Callable[[torch.Tensor], torch.Tensor]  # what nn.Module._apply maps over tensors


def _register(module: nn.Module, qw: QuantizedWeight, packed: Packed) -> tuple[str, ...]:
    """Register the record's tensors and a layout's buffers (not persistent: checkpoints write
    the record). -> the layout's buffer names"""
    for name, t in qw.tensors("record").items():
        module.register_buffer(name.replace(".", "_"), t, persistent=False)
    for name, t in packed.items():
        module.register_buffer(name, t, persistent=False)
    return tuple(packed)


def _apply_keeping_dtypes(module: nn.Module, fn: TensorFn, recurse: bool) -> torch.device:
    """nn.Module._apply for a packed layer: its buffers (codes, scales in the formats the record
    and the layout define) move but keep their dtypes, so `.float()` or `.half()` on a model
    leaves the packed layers working. -> the device the record's buffers are on now."""
    dtypes = {name: b.dtype for name, b in module._buffers.items() if b is not None}
    nn.Module._apply(module, fn, recurse)
    for name, dtype in dtypes.items():
        b = module._buffers.get(name)
        if b is not None and b.dtype != dtype:
            module._buffers[name] = b.to(dtype)
    return module._buffers["record_packed"].device


def _point_record(module: nn.Module, qw: QuantizedWeight) -> None:
    """The record buffers are the record's own tensors again (no second copy on a device)."""
    for name, t in qw.tensors("record").items():
        module._buffers[name.replace(".", "_")] = t


def _repack(module: nn.Module, packed: Packed) -> None:
    """Replace the layout buffers of `module` with `packed`."""
    for name in module._packed_names:
        del module._buffers[name]
    for name, t in packed.items():
        module.register_buffer(name, t, persistent=False)
    module._packed_names = tuple(packed)


class QuantLinear(nn.Module):
    is_tinyllm_linear = True

    def __init__(
        self, qw: QuantizedWeight, bias: torch.Tensor | None = None, kernel: str | None = None
    ) -> None:
        """`kernel` forces a layout by name ("q4", "int4", "q8", "int8", "dequant")."""
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.qweight = qw
        self.forced = kernel
        self.layout: Layout = layout_named(kernel) if kernel else choose_layout(qw)
        self.kernel = self.layout.name
        self._packed_names = _register(self, qw, self.layout.pack(qw))
        self._device = qw.packed.device  # where the layout's buffers were packed for
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    def _apply(self, fn: TensorFn, recurse: bool = True) -> QuantLinear:
        """`.to(device)`, `.cuda()`, `.cpu()`: the record follows its buffers, and a layout that
        does not run on the new device (tinyllm's C++ and PyTorch's packed CPU kernels) gives
        way to the first that does there (dequantize-and-matmul off the CPU)."""
        device = _apply_keeping_dtypes(self, fn, recurse)
        if device != self._device:
            self._follow(device)
        return self

    def _follow(self, device: torch.device) -> None:
        qw = self.qweight
        if qw.packed.device != device:
            qw.to_(device)  # in place: a tied embedding holding the same record sees it moved
        _point_record(self, qw)
        target = Target(device)
        layout = layout_named(self.forced) if self.forced else None
        if layout is None or not layout.supports(qw, target):
            layout = choose_layout(qw, target)
        if layout is not self.layout:
            self.layout, self.kernel = layout, layout.name
            _repack(self, layout.pack(qw))
        self._device = device

    def packed(self) -> Packed:
        """The layout's buffers as they are now (the runtime may swap them for views)."""
        return {name: self._buffers[name] for name in self._packed_names}

    def logical_numel(self) -> int:
        return self.in_features * self.out_features

    def weight_storage_bits(self) -> int:
        return self.qweight.storage_bits()

    def dequantized_weight(self) -> torch.Tensor:
        if self.qweight.packed.is_meta:  # loaded for inference: the layout holds the codes
            return self.layout.unpack(self.packed(), self.qweight)
        return self.qweight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        shape = x.shape
        y = self.layout.forward(x.reshape(-1, shape[-1]), self.packed(), self.qweight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        q = self.qweight
        return (
            f"in={self.in_features}, out={self.out_features}, bits={q.bits}, "
            f"group={q.group_size}, sym={q.sym}, kernel={self.kernel}"
        )


def replace_linear(model: nn.Module, name: str, qw: QuantizedWeight) -> QuantLinear:
    """Swap the nn.Linear at `name` for a QuantLinear holding `qw` (its bias is kept)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    new = QuantLinear(qw, getattr(old, "bias", None))
    setattr(parent, child, new)
    return new


class ActQuantLinear(nn.Module):
    """A linear layer that quantizes its input too (W8A8, FP8), with its weight in a record.

    INT8: the input is quantized per token (dynamic) or with calibrated static scales, and the
    product runs as an integer GEMM (`torch._int_mm`, int8 x int8 -> int32 on oneDNN/VNNI), with
    the rescale (and the zero-point correction, a constant per output row) applied after it. For a
    per-channel static scale the record holds the codes of W diag(s) (see kernels/actquant.py).
    FP8: simulated, as CPUs here have no FP8 GEMM: the input is rounded to the FP8 grid and
    multiplied by the dequantized FP8 weight in float32.
    """

    is_tinyllm_linear = True

    def __init__(
        self, qw: QuantizedWeight, act: ActivationQuant, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.qweight, self.act = qw, act
        self.layout: ActLayout = choose_act_layout(qw, act)
        self.kernel = self.layout.name
        self._packed_names = _register(self, qw, self.layout.pack(qw, act))
        self._device = qw.packed.device
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    def _apply(self, fn: TensorFn, recurse: bool = True) -> ActQuantLinear:
        """`.to(device)`: the record and the activation spec follow the buffers."""
        device = _apply_keeping_dtypes(self, fn, recurse)
        if device != self._device:
            self.qweight.to_(device)
            self.act.to_(device)
            _point_record(self, self.qweight)
            _repack(self, self.layout.pack(self.qweight, self.act))
            self._device = device
        return self

    def logical_numel(self) -> int:
        return self.in_features * self.out_features

    def weight_storage_bits(self) -> int:
        return self.qweight.storage_bits()

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer stands for (a folded per-channel input scale undone)."""
        w = self.qweight.dequantize()
        if self.act.granularity == "channel":
            w = w / self.act.scale
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        packed = {name: self._buffers[name] for name in self._packed_names}
        y = self.layout.matmul(x2, packed, self.act)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        q = self.qweight
        return (
            f"in={self.in_features}, out={self.out_features}, weight {q.bits}-bit, "
            f"input {self.act.describe()}, kernel={self.kernel}"
        )


def replace_act_linear(
    model: nn.Module, name: str, qw: QuantizedWeight, act: ActivationQuant
) -> ActQuantLinear:
    """Swap the linear at `name` for an ActQuantLinear (its bias is kept)."""
    old = model.get_submodule(name)
    new = ActQuantLinear(qw, act, getattr(old, "bias", None))
    set_module(model, name, new)
    return new


class QuantEmbedding(nn.Module):
    """A token embedding whose table stays packed; a lookup dequantizes only the rows it reads.

    With tied embeddings the output head is a QuantLinear holding the same QuantizedWeight, so the
    table is stored once.
    """

    is_tinyllm_embedding = True

    def __init__(
        self, qw: QuantizedWeight, padding_idx: int | None = None, scale: float = 1.0
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qw.shape
        self.padding_idx = padding_idx
        self.output_scale = scale  # families that scale embeddings (Gemma: sqrt(hidden))
        self.qweight = qw
        for name, t in qw.tensors("record").items():
            self.register_buffer(name.replace(".", "_"), t, persistent=False)

        self._device = qw.packed.device

    def _apply(self, fn: TensorFn, recurse: bool = True) -> QuantEmbedding:
        """`.to(device)`: the record follows its buffers (rows are dequantized where it is)."""
        device = _apply_keeping_dtypes(self, fn, recurse)
        if device != self._device:
            self.qweight.to_(device)  # a no-op when a tied head moved it first
            _point_record(self, self.qweight)
            self._device = device
        return self

    def logical_numel(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def weight_storage_bits(self) -> int:
        return self.qweight.storage_bits()

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., dim]
        flat = ids.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        rows = self.qweight.rows(uniq)[inverse]
        if self.output_scale != 1.0:
            rows = rows * self.output_scale
        return rows.reshape(*ids.shape, self.embedding_dim)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_embedding(model: nn.Module, name: str, qw: QuantizedWeight) -> QuantEmbedding:
    """Swap the nn.Embedding at `name` for a QuantEmbedding holding `qw`."""
    old = model.get_submodule(name)
    scale = getattr(old, "embed_scale", 1.0)
    scale = float(scale) if not isinstance(scale, torch.Tensor) else float(scale.item())
    new = QuantEmbedding(qw, getattr(old, "padding_idx", None), scale)
    set_module(model, name, new)
    return new


def drop_records(model: nn.Module) -> int:
    """For inference only: free the packed codes of each layer whose layout keeps its own copy
    and never reads the record's (tinyllm's 4-bit C++ layout: its GEMV and its unpack for long
    prompts read only its buffers). A 4-bit model then holds its codes once instead of twice.
    The record's scales and metadata stay; the model can no longer be saved, exported or moved
    to another device (checkpoint writing refuses it). -> bytes freed"""
    freed = 0
    for mod in model.modules():
        if not isinstance(mod, QuantLinear) or mod.layout.name != "q4":
            continue
        qw = mod.qweight
        if qw.packed.is_meta:
            continue
        freed += qw.packed.numel() * qw.packed.element_size()
        qw.packed = torch.empty(qw.packed.shape, dtype=qw.packed.dtype, device="meta")
        mod._buffers["record_packed"] = qw.packed
    return freed
