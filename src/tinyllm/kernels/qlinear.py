"""`QuantLinear`: a linear layer whose weight stays packed in memory, with real kernels.

- 4-bit affine, no permutation, output rows a multiple of 16: tinyllm's own C++ GEMV
  (kernels/native.py, csrc/q4gemv.cpp), built on first use; where it cannot be built, PyTorch's CPU
  int4 kernel (`_weight_int4pack_mm_for_cpu`) for groups of 32/64/128/256.
- 8-bit symmetric per output channel: tinyllm's own C++ GEMV (q8, 16-row interleaved codes,
  5x faster than PyTorch's here), else PyTorch's `_weight_int8pack_mm`.
- Anything else (2/3/5 bits, codebooks, permutations): unpack and dequantize on each call.
Inputs of more than `max_rows` rows (prefill, evaluation) unpack the weight for that call and use
the float matmul: tinyllm's kernels convert each weight once per tile of 8 input rows, so they
stay ahead of unpacking up to NATIVE_MAX_ROWS rows (a decode batch of the runtime); PyTorch's
packed kernels only up to PACKED_KERNEL_MAX_ROWS. The QuantizedWeight record is kept as buffers
too (checkpoints are written from it), so memory accounting sees both it and the kernel's copy.
"""

from __future__ import annotations

import torch
from torch import nn

from tinyllm.kernels import native
from tinyllm.kernels.actquant import ActivationQuant
from tinyllm.kernels.qweight import QuantizedWeight

INT4_GROUPS = (32, 64, 128, 256)
# PyTorch's packed CPU kernels are GEMV-oriented: at prefill sizes they were 30-50x slower than
# an fp32 matmul on the unpacked weight here (benchmarks/bench_quant.py), so larger inputs unpack.
PACKED_KERNEL_MAX_ROWS = 8
NATIVE_MAX_ROWS = 64


def choose_kernel(qw: QuantizedWeight) -> str:
    plain = qw.codebook is None and qw.perm is None
    q4_shape = qw.shape[0] % native.LANES == 0 and qw.effective_group % 2 == 0
    if plain and qw.bits == 4 and q4_shape and native.q4_kernel() is not None:
        return "q4"
    int4_shape = qw.shape[1] % 64 == 0 and qw.shape[0] % 16 == 0
    if plain and qw.bits == 4 and qw.group_size in INT4_GROUPS and int4_shape:
        return "int4"
    per_row_int8 = plain and qw.bits == 8 and qw.sym and qw.group_size == -1
    if per_row_int8 and qw.shape[0] % native.LANES == 0 and native.q4_kernel() is not None:
        return "q8"
    if per_row_int8:
        return "int8"
    return "dequant"


class QuantLinear(nn.Module):
    is_tinyllm_linear = True

    def __init__(
        self, qw: QuantizedWeight, bias: torch.Tensor | None = None, kernel: str | None = None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.qweight = qw
        self.kernel = kernel or choose_kernel(qw)
        for name, t in qw.tensors("record").items():
            self.register_buffer(name.replace(".", "_"), t, persistent=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        if self.kernel == "q4":
            codes, scale, zero = native.repack_q4(qw.codes(), qw.scale, qw.zero)
            self.register_buffer("w_q4", codes, persistent=False)
            self.register_buffer("w_q4_scale", scale, persistent=False)
            self.register_buffer("w_q4_zero", zero, persistent=False)
        elif self.kernel == "int4":
            self._prepare_int4(qw)
        elif self.kernel == "q8":
            codes = (qw.codes().to(torch.int16) - (1 << (qw.bits - 1))).to(torch.int8)
            packed, scale = native.repack_q8(codes, qw.scale.float().reshape(-1))
            self.register_buffer("w_q8", packed, persistent=False)
            self.register_buffer("w_q8_scale", scale, persistent=False)
        elif self.kernel == "int8":
            codes = qw.codes().to(torch.int16) - (1 << (qw.bits - 1))
            self.register_buffer("w_int8", codes.to(torch.int8), persistent=False)
            self.register_buffer("w_scale", qw.scale.float().reshape(-1), persistent=False)

    def _prepare_int4(self, qw: QuantizedWeight) -> None:
        codes = qw.codes().to(torch.int32)  # [out, in]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        scale = qw.scale.float()  # [out, groups]
        # The kernel computes (q - 8) * s + z; ours is (q - zero) * s, so z = (8 - zero) * s.
        zf = (8 - qw.zero.float()) * scale
        self.register_buffer("w_int4", packed, persistent=False)
        self.register_buffer(
            "w_sz", torch.stack([scale.t(), zf.t()], -1).contiguous(), persistent=False
        )

    def logical_numel(self) -> int:
        return self.in_features * self.out_features

    def weight_storage_bits(self) -> int:
        return self.qweight.storage_bits()

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        native_kernel = self.kernel in ("q4", "q8")
        max_rows = NATIVE_MAX_ROWS if native_kernel else PACKED_KERNEL_MAX_ROWS
        if x2.shape[0] > max_rows and self.kernel == "q4":  # prefill: unpack in C++, float GEMM
            w = native.q4_kernel().q4_dequant(
                self.w_q4, self.w_q4_scale, self.w_q4_zero, self.qweight.effective_group
            )
            y = x2 @ w.to(x2.dtype).t()
        elif x2.shape[0] > max_rows:  # prefill: unpack once, float matmul
            y = x2 @ self.qweight.dequantize().to(x2.dtype).t()
        elif self.kernel == "q4":
            group = self.qweight.effective_group
            y = (
                native.q4_kernel()
                .q4_gemv(x2.float(), self.w_q4, self.w_q4_scale, self.w_q4_zero, group)
                .to(x2.dtype)
            )
        elif self.kernel == "q8":
            y = native.q4_kernel().q8_gemv(x2.float(), self.w_q8, self.w_q8_scale).to(x2.dtype)
        elif self.kernel == "int4":
            dt = x2.dtype
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.float(), self.w_int4, self.qweight.group_size, self.w_sz
            ).to(dt)
        elif self.kernel == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2.float(), self.w_int8, self.w_scale).to(
                x2.dtype
            )
        else:
            y = x2 @ self.qweight.dequantize().to(x2.dtype).t()
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
        self.kernel = "int8_mm" if act.dtype == "int8" else "fp8_simulated"
        for name, t in qw.tensors("record").items():
            self.register_buffer(name.replace(".", "_"), t, persistent=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        if self.kernel == "int8_mm":
            if not (qw.bits == 8 and qw.sym and qw.group_size == -1 and qw.codebook is None):
                raise ValueError("int8 activations need a symmetric 8-bit per-row weight record")
            codes = (qw.codes().to(torch.int16) - 128).to(torch.int8)  # [out, in]
            self.register_buffer("w_i8", codes, persistent=False)
            self.register_buffer("w_i8_scale", qw.scale.float().reshape(1, -1), persistent=False)
            zero_term = None
            if act.zero is not None:  # (x_q - z) W^T = x_q W^T - z W^T: a constant row
                zero_term = (act.zero.to(torch.int32).expand(qw.shape[1]) @ codes.int().t())[None]
            self.register_buffer("zero_term", zero_term, persistent=False)
        else:
            self.register_buffer("w_float", qw.dequantize(), persistent=False)

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
        if self.kernel == "int8_mm":
            q, sx = self.act.quantize_int8(x2)  # int8 [m, in], [m, 1] | [1]
            acc = torch._int_mm(q, self.w_i8.t())  # int32 [m, out]
            if self.zero_term is not None:
                acc = acc - self.zero_term
            y = acc.float() * (sx * self.w_i8_scale)
        else:
            y = self.act.fake(x2) @ self.w_float.t()
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
