"""Packed weight layouts: one class per way a layer keeps its weight for its matmul.

A layout says which `QuantizedWeight` records it takes (`supports`), what it keeps in memory for
them (`pack`, a dict of tensors the module registers as buffers) and how it multiplies an input
by them (`matmul`). `LAYOUTS` is ordered: the first layout that supports a record wins, so
tinyllm's C++ kernels come before PyTorch's packed kernels, and the float fallback comes last.

Weight-only layouts (`QuantLinear`):
- `Q4Native` ("q4"): 4-bit affine codes, 16 output rows interleaved per lane group, tinyllm's C++
  GEMV (csrc/q4gemv.cpp); the runtime fuses q/k/v and gate/up through the same class.
- `Int4Torch` ("int4"): PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`), groups of
  32/64/128/256.
- `Q8Native` ("q8"): 8-bit symmetric per output row, 16-row interleaved codes, tinyllm's C++ GEMV.
- `Int8Torch` ("int8"): the same record on PyTorch's `_weight_int8pack_mm`.
- `Dequant` ("dequant"): anything else (2/3/5 bits, NF4 codebooks, permutations, other devices):
  unpack and dequantize on each call.
Activation-quantized layouts (`ActQuantLinear`, `ACT_LAYOUTS`):
- `W8A8Int` ("int8_mm"): int8 x int8 -> int32 GEMM (`torch._int_mm`), rescaled after.
- `FP8Simulated` ("fp8_simulated"): input rounded to the FP8 grid, float matmul.

Inputs of more than `max_rows` rows (prefill, evaluation) unpack the weight for that call and use
the float matmul: tinyllm's kernels convert each weight once per tile of 8 input rows, so they
stay ahead of unpacking up to NATIVE_MAX_ROWS rows (a decode batch of the runtime); PyTorch's
packed kernels only up to PACKED_KERNEL_MAX_ROWS. The C++ kernels run on CPU tensors only: a record
on another device, or a machine where they cannot be built, gets the next layout that fits.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from tinyllm.kernels import native
from tinyllm.kernels.actquant import ActivationQuant
from tinyllm.kernels.qweight import QuantizedWeight

Packed = Mapping[str, torch.Tensor | None]  # a layout's buffers, by name
INT4_GROUPS = (32, 64, 128, 256)
# PyTorch's packed CPU kernels are GEMV-oriented: at prefill sizes they were 30-50x slower than
# an fp32 matmul on the unpacked weight here (benchmarks/bench_quant.py), so larger inputs unpack.
PACKED_KERNEL_MAX_ROWS = 8
NATIVE_MAX_ROWS = 64


@dataclass
class Target:
    """Where a layer runs: its device, and (asked at most once, on demand) whether tinyllm's C++
    ops load there."""

    device: torch.device

    @property
    def cpu(self) -> bool:
        return self.device.type == "cpu"

    @functools.cached_property
    def native(self) -> bool:
        return self.cpu and native.q4_kernel() is not None

    @classmethod
    def of(cls, qw: QuantizedWeight) -> Target:
        return cls(qw.packed.device)


def _plain(qw: QuantizedWeight) -> bool:
    """An affine grid in stored column order (no codebook, no permutation, no K-quant mins or
    float32 scales)."""
    return qw.codebook is None and qw.perm is None and qw.kquant is None


def _per_row_int8(qw: QuantizedWeight) -> bool:
    return _plain(qw) and qw.bits == 8 and qw.sym and qw.group_size == -1


def _signed_codes(qw: QuantizedWeight) -> torch.Tensor:
    """Codes of an 8-bit symmetric record as int8 (code - 128). -> int8 [out, in]"""
    return (qw.codes().to(torch.int16) - (1 << (qw.bits - 1))).to(torch.int8)


class Layout:
    """A weight-only packed layout; subclasses set `name` and implement the three methods."""

    name: ClassVar[str]
    max_rows: ClassVar[int] = PACKED_KERNEL_MAX_ROWS

    def supports(self, qw: QuantizedWeight, target: Target) -> bool:
        raise NotImplementedError

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """The tensors this layout keeps for `qw`, besides the record itself."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, packed: Packed, qw: QuantizedWeight) -> torch.Tensor:
        """x @ W^T for a small input. x [m, in] -> [m, out], in x's dtype."""
        raise NotImplementedError

    def unpack(self, packed: Packed, qw: QuantizedWeight) -> torch.Tensor:
        """The float weight, for inputs over `max_rows` rows. -> [out, in]"""
        return qw.dequantize()

    def forward(self, x: torch.Tensor, packed: Packed, qw: QuantizedWeight) -> torch.Tensor:
        """x @ W^T through the kernel, or through the unpacked weight for large inputs."""
        if x.shape[0] > self.max_rows:
            return x @ self.unpack(packed, qw).to(x.dtype).t()
        return self.matmul(x, packed, qw)


class Q4Native(Layout):
    """4-bit affine codes for tinyllm's C++ GEMV: [N/16, K/2, 16] nibbles, fp16 scale/zero."""

    name = "q4"
    max_rows = NATIVE_MAX_ROWS
    BUFFERS = ("w_q4", "w_q4_scale", "w_q4_zero")

    def supports(self, qw: QuantizedWeight, target: Target) -> bool:
        shape = qw.shape[0] % native.LANES == 0 and qw.effective_group % 2 == 0
        return _plain(qw) and qw.bits == 4 and shape and target.native

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return dict(zip(self.BUFFERS, native.repack_q4(qw.codes(), qw.scale, qw.zero), strict=True))

    def matmul(self, x: torch.Tensor, packed: Packed, qw: QuantizedWeight) -> torch.Tensor:
        return self.gemv(x.float(), packed, qw.effective_group).to(x.dtype)

    def unpack(self, packed: Packed, qw: QuantizedWeight) -> torch.Tensor:
        w, s, z = (packed[n] for n in self.BUFFERS)
        return native.q4_kernel().q4_dequant(w, s, z, qw.effective_group)

    @classmethod
    def gemv(
        cls,
        x: torch.Tensor,
        packed: Packed,
        group: int,
        i8: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """float32 x [m, in] -> [m, out] (into `out` when given); `i8` rounds x to int8 per
        block of 32 (not exact)."""
        k = native.q4_kernel()
        fn = k.q4_gemv_i8 if i8 else k.q4_gemv
        return fn(x, *(packed[n] for n in cls.BUFFERS), group, out=out)

    @staticmethod
    def i8_supported(group: int) -> bool:
        """Whether the int8-activation GEMV runs here (AVX512-VNNI or AVX2) for this group size."""
        return group % 32 == 0 and bool(native.q4_kernel().q4_i8_supported())


class Int4Torch(Layout):
    """4-bit codes in PyTorch's CPU int4pack layout, scale and zero as [groups, out, 2]."""

    name = "int4"

    def supports(self, qw: QuantizedWeight, target: Target) -> bool:
        shape = qw.shape[1] % 64 == 0 and qw.shape[0] % 16 == 0
        return _plain(qw) and qw.bits == 4 and qw.group_size in INT4_GROUPS and shape and target.cpu

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        codes = qw.codes().to(torch.int32)  # [out, in]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        scale = qw.scale.float()  # [out, groups]
        # The kernel computes (q - 8) * s + z; ours is (q - zero) * s, so z = (8 - zero) * s.
        zf = (8 - qw.zero.float()) * scale
        return {"w_int4": packed, "w_sz": torch.stack([scale.t(), zf.t()], -1).contiguous()}

    def matmul(self, x: torch.Tensor, packed: Packed, qw: QuantizedWeight) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.float(), packed["w_int4"], qw.group_size, packed["w_sz"]
        ).to(x.dtype)


class Q8Native(Layout):
    """8-bit symmetric per-row codes for the C++ GEMV: int8 [N/16, K, 16], scale [N/16, 16]."""

    name = "q8"
    max_rows = NATIVE_MAX_ROWS

    def supports(self, qw: QuantizedWeight, target: Target) -> bool:
        return _per_row_int8(qw) and qw.shape[0] % native.LANES == 0 and target.native

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        codes, scale = native.repack_q8(_signed_codes(qw), qw.scale.float().reshape(-1))
        return {"w_q8": codes, "w_q8_scale": scale}

    def matmul(self, x: torch.Tensor, packed: Packed, qw: QuantizedWeight) -> torch.Tensor:
        k = native.q4_kernel()
        return k.q8_gemv(x.float(), packed["w_q8"], packed["w_q8_scale"]).to(x.dtype)

    @staticmethod
    def gemv_i8(x: torch.Tensor, packed: Packed, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 x [m, in] rounded to int8 per block of 32, times the codes (not exact)."""
        return native.q4_kernel().q8_gemv_i8(x, packed["w_q8"], packed["w_q8_scale"], out=out)

    @staticmethod
    def i8_supported(in_features: int) -> bool:
        return in_features % 32 == 0 and bool(native.q4_kernel().q4_i8_supported())


class Int8Torch(Layout):
    """8-bit symmetric per-row codes as int8 [out, in] for PyTorch's `_weight_int8pack_mm`."""

    name = "int8"

    def supports(self, qw: QuantizedWeight, target: Target) -> bool:
        return _per_row_int8(qw) and target.cpu

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {"w_int8": _signed_codes(qw), "w_scale": qw.scale.float().reshape(-1)}

    def matmul(self, x: torch.Tensor, packed: Packed, qw: QuantizedWeight) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.float(), packed["w_int8"], packed["w_scale"])
        return y.to(x.dtype)


class Dequant(Layout):
    """No copy: the record is unpacked and dequantized on each call (any bits, codebook, device)."""

    name = "dequant"

    def supports(self, qw: QuantizedWeight, target: Target) -> bool:
        return True

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {}

    def matmul(self, x: torch.Tensor, packed: Packed, qw: QuantizedWeight) -> torch.Tensor:
        return x @ qw.dequantize().to(x.dtype).t()


LAYOUTS: tuple[Layout, ...] = (Q4Native(), Int4Torch(), Q8Native(), Int8Torch(), Dequant())
BY_NAME: dict[str, Layout] = {layout.name: layout for layout in LAYOUTS}


def choose_layout(qw: QuantizedWeight, target: Target | None = None) -> Layout:
    """The first layout in `LAYOUTS` that supports `qw` on `target` (default: qw's device)."""
    target = target or Target.of(qw)
    return next(layout for layout in LAYOUTS if layout.supports(qw, target))


def layout_named(name: str) -> Layout:
    """The weight-only layout called `name` ("q4", "int4", "q8", "int8", "dequant")."""
    if name not in BY_NAME:
        raise KeyError(f"unknown kernel layout '{name}'; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]


class ActLayout:
    """A layout whose matmul quantizes its input too; `pack` may fold the activation spec in."""

    name: ClassVar[str]

    def supports(self, qw: QuantizedWeight, act: ActivationQuant) -> bool:
        raise NotImplementedError

    def pack(self, qw: QuantizedWeight, act: ActivationQuant) -> dict[str, torch.Tensor | None]:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, packed: Packed, act: ActivationQuant) -> torch.Tensor:
        """float32 x [m, in] -> float32 [m, out]."""
        raise NotImplementedError


class W8A8Int(ActLayout):
    """int8 codes [out, in] and per-row scales; input quantized per token or statically."""

    name = "int8_mm"

    def supports(self, qw: QuantizedWeight, act: ActivationQuant) -> bool:
        return (
            act.dtype == "int8"
            and qw.bits == 8
            and qw.sym
            and qw.group_size == -1
            and (qw.codebook is None)
        )

    def pack(self, qw: QuantizedWeight, act: ActivationQuant) -> dict[str, torch.Tensor | None]:
        codes = (qw.codes().to(torch.int16) - 128).to(torch.int8)  # [out, in]
        zero_term = None
        if act.zero is not None:  # (x_q - z) W^T = x_q W^T - z W^T: a constant row
            # sum_i z_i W[o, i] in exact int32, on any device (CUDA has no int32 matmul)
            zero = act.zero.to(torch.int32).expand(qw.shape[1])  # [in]
            zero_term = (codes.int() * zero).sum(dim=1, dtype=torch.int32)[None]  # [1, out]
        return {
            "w_i8": codes,
            "w_i8_scale": qw.scale.float().reshape(1, -1),
            "zero_term": zero_term,
        }

    def matmul(self, x: torch.Tensor, packed: Packed, act: ActivationQuant) -> torch.Tensor:
        q, sx = act.quantize_int8(x)  # int8 [m, in], [m, 1] | [1]
        acc = int_mm(q, packed["w_i8"].t())  # int32 [m, out]
        if packed["zero_term"] is not None:
            acc = acc - packed["zero_term"]
        return acc.float() * (sx * packed["w_i8_scale"])


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 a [m, k] @ int8 b [k, n] -> int32 [m, n], exact on any device. CUDA's kernel
    (`torch._int_mm`) takes only m > 16 and k, n multiples of 8: small inputs are padded with
    zero rows, other shapes multiply in float64 (exact: every sum is far below 2^53)."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    (m, k), n = a.shape, b.shape[1]
    if k % 8 or n % 8:
        return (a.double() @ b.double()).to(torch.int32)
    if m <= 16:
        return torch._int_mm(torch.cat([a, a.new_zeros(17 - m, k)]), b)[:m]
    return torch._int_mm(a, b)


class FP8Simulated(ActLayout):
    """The dequantized float weight; the input is rounded to the FP8 grid (no FP8 GEMM here)."""

    name = "fp8_simulated"

    def supports(self, qw: QuantizedWeight, act: ActivationQuant) -> bool:
        return act.dtype != "int8"

    def pack(self, qw: QuantizedWeight, act: ActivationQuant) -> dict[str, torch.Tensor | None]:
        return {"w_float": qw.dequantize()}

    def matmul(self, x: torch.Tensor, packed: Packed, act: ActivationQuant) -> torch.Tensor:
        return act.fake(x) @ packed["w_float"].t()


ACT_LAYOUTS: tuple[ActLayout, ...] = (W8A8Int(), FP8Simulated())


def choose_act_layout(qw: QuantizedWeight, act: ActivationQuant) -> ActLayout:
    """The first layout in `ACT_LAYOUTS` that takes `qw` with input quantization `act`."""
    for layout in ACT_LAYOUTS:
        if layout.supports(qw, act):
            return layout
    raise ValueError("int8 activations need a symmetric 8-bit per-row weight record")
