"""Quantization-aware training: a trainable stand-in for `QuantLinear` that keeps its grid.

`FakeQuantLinear` holds a float weight (initialised to the record's dequantized values) and the
record's scales as parameters; its forward rounds the weight to the same grid (bits, group size,
zero points, column permutation, codebook) with a straight-through estimator: rounding passes the
gradient to the weight unchanged inside the grid's range and the scales learn as in LSQ (Esser et
al. 2020). The scales are trained as log-magnitudes (sign kept fixed): an Adam step then changes a
scale by a bounded *relative* amount whatever its size. Trained directly, a scale of ~0.01 moves
by lr per step like any weight, which at QAT learning rates is a 10-20% change in 60 steps and
made the measured models worse than before training (benchmarks/HISTORY.md, distillation and QAT).
`to_record()` turns it back into a packed `QuantizedWeight` with the same layout, so a
trained student is saved as a real quantized checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.errors import ConfigError
from tinyllm.kernels.primitives import grouped, qmax
from tinyllm.kernels.qlinear import QuantLinear
from tinyllm.kernels.qweight import QuantizedWeight, dequantize_scales, double_quantize_scales


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (x.round() - x).detach()


class FakeQuantLinear(nn.Module):
    is_tinyllm_linear = True

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if qw.kquant is not None:
            raise ConfigError(
                f"QAT of {qw.kquant} super-block grids is not supported yet: train a checkpoint "
                "on a plain grid (e.g. --gguf-compatible q4_0), or distill before quantizing"
            )
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size, self.sym = qw.bits, qw.group_size, qw.sym
        self.double_quant = qw.scale_dq is not None
        self.weight = nn.Parameter(qw.dequantize())  # [out, in], original column order
        scale = qw.scale.float()  # [out, groups]; a symmetric grid may hold negative scales
        self.register_buffer("scale_sign", torch.where(scale < 0, -1.0, 1.0))
        self.log_scale = nn.Parameter(scale.abs().clamp_min(torch.finfo(torch.float32).tiny).log())
        self.register_buffer("zero", qw.zero.float().clone())
        self.register_buffer("perm", None if qw.perm is None else qw.perm.clone())
        self.register_buffer("codebook", None if qw.codebook is None else qw.codebook.clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def scale(self) -> torch.Tensor:
        """The current scales (differentiable to `log_scale`). [out, groups]"""
        return self.scale_sign * self.log_scale.exp()

    def _stored_order(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.perm is None else w[:, self.perm]

    def _stored_scale(self) -> torch.Tensor:
        """The scales as the record stores them (float16, or double-quantized), straight-through,
        so training sees exactly the weights the packed checkpoint will hold."""
        s = self.scale
        if self.double_quant:
            stored = dequantize_scales(double_quantize_scales(s.detach())).reshape(s.shape)
        else:
            stored = s.detach().half().float()
        return s + (stored - s).detach()

    def _codes(self, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Grid positions (straight-through rounded) of grouped weights. [out, G, g]"""
        if self.codebook is not None:
            normed = g / scale[..., None]
            idx = (normed.detach()[..., None] - self.codebook).abs().argmin(-1)
            return normed + (self.codebook[idx] - normed).detach()  # codebook value, STE
        q = round_ste(g / scale[..., None]) + self.zero[..., None]
        return q.clamp(0, qmax(self.bits)) - self.zero[..., None]

    def quantized_weight(self) -> torch.Tensor:
        """The weight on the grid, differentiable to weight and scale. -> [out, in]"""
        g = grouped(self._stored_order(self.weight), self.group_size)  # [out, G, g]
        scale = self._stored_scale()
        w = (self._codes(g, scale) * scale[..., None]).reshape(self.weight.shape)
        return w if self.perm is None else w[:, torch.argsort(self.perm)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def to_record(self) -> QuantizedWeight:
        """The packed record of the current weight, with the scales as they will be stored."""
        dq = double_quantize_scales(self.scale) if self.double_quant else None
        scale = self._stored_scale()
        g = grouped(self._stored_order(self.weight), self.group_size)
        if self.codebook is not None:
            normed = g / scale[..., None]
            codes = (normed[..., None] - self.codebook).abs().argmin(-1)
        else:
            codes = (g / scale[..., None] + self.zero[..., None]).round().clamp(0, qmax(self.bits))
        qw = QuantizedWeight.from_codes(
            codes.reshape(self.weight.shape),
            scale,
            self.zero,
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            perm=self.perm,
            codebook=self.codebook,
        )
        if dq is not None:
            qw.scale, qw.scale_dq = scale.contiguous(), dq
        return qw

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, fake-quant"


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def to_fake_quant(model: nn.Module) -> list[str]:
    """Replace every QuantLinear by a FakeQuantLinear (in place); returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        old = model.get_submodule(name)
        _swap(model, name, FakeQuantLinear(old.qweight, old.bias))
    return names


def to_quant(model: nn.Module) -> list[str]:
    """Replace every FakeQuantLinear by a packed QuantLinear (in place); returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name in names:
        old = model.get_submodule(name)
        bias = None if old.bias is None else old.bias.detach()
        _swap(model, name, QuantLinear(old.to_record(), bias))
    return names
