"""Pure functions: quantization parameters, quantize / dequantize, bit packing.

Convention: codes are unsigned integers q in [0, 2^bits - 1]; a weight is recovered as
`scale * (q - zero)` with one (scale, zero) per output row and group of `group_size` input columns.
Symmetric grids fix zero at 2^(bits-1) and use the full signed range as GGUF's Q4_0 does: the
scale takes the sign of the value of largest magnitude, which maps exactly to code 0 (so scales
may be negative); asymmetric grids take an integer zero point.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 5, 8)
SUPPORTED_GROUPS = (-1, 32, 64, 128)
SHRINK_GRID = torch.linspace(1.0, 0.5, 26)  # candidate range shrinks for the MSE search


def qmax(bits: int) -> int:
    return (1 << bits) - 1


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows, cols] -> [rows, groups, group_size] (group_size -1: one group per row)."""
    rows, cols = w.shape
    g = cols if group_size == -1 else group_size
    return w.reshape(rows, cols // g, g)


def _affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool):
    """Scale and integer zero for ranges [lo, hi] (any shape)."""
    if sym:  # GGUF Q4_0 style: the signed extreme maps exactly to code 0, so it is never clipped
        half = 1 << (bits - 1)
        extreme = torch.where(hi.abs() >= lo.abs(), hi, lo)
        scale = -extreme / half
        scale = torch.where(scale.abs() < 1e-10, torch.full_like(scale, -1e-10), scale)
        zero = torch.full_like(scale, float(half))
        return scale, zero
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale = ((hi - lo) / qmax(bits)).clamp_min(1e-10)
    zero = (-lo / scale).round().clamp(0, qmax(bits))
    return scale, zero


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to the grid and back (shapes broadcast)."""
    q = (w / scale + zero).round().clamp(0, qmax(bits))
    return scale * (q - zero)


def group_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    mse: bool = False,
    norm: float = 2.4,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) scale and zero. [rows, cols] -> ([rows, groups], [rows, groups])

    With `mse`, each group's range is shrunk by the factor in SHRINK_GRID that minimises
    sum |w - fake_quant(w)|^norm (the clipping search of GPTQ's reference code and AWQ), each
    column's error weighted by `importance` [cols] when given (for example the inputs' mean
    square, diag H: then the sum is the diagonal part of the output error, as llama.cpp's
    importance matrix weighs its scale search).
    """
    g = grouped(w.float(), group_size)  # [rows, groups, gs]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale, zero = _affine_params(lo, hi, bits, sym)
    if not mse:
        return scale, zero
    imp = None if importance is None else grouped(importance.float()[None], group_size)
    best = torch.full_like(scale, float("inf"))
    for shrink in SHRINK_GRID.tolist():
        s, z = _affine_params(lo * shrink, hi * shrink, bits, sym)
        s3, z3 = s[..., None], z[..., None]
        # fake_quant(g) - g, in place (the search's cost is its passes over the weight)
        diff = torch.div(g, s3).add_(z3).round_().clamp_(0, qmax(bits)).sub_(z3).mul_(s3).sub_(g)
        diff = diff.mul_(diff) if norm == 2.0 else diff.abs_().pow_(norm)
        err = (diff if imp is None else diff.mul_(imp)).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Integer codes of w on the grid. [rows, cols] -> uint8 [rows, cols]"""
    g = grouped(w.float(), group_size)
    q = (g / scale[..., None] + zero[..., None]).round().clamp(0, qmax(bits))
    return q.reshape(w.shape).to(torch.uint8)


def dequantize_codes(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """scale * (q - zero), group-wise. -> float32 [rows, cols]"""
    g = grouped(q.float(), group_size)
    return ((g - zero[..., None].float()) * scale[..., None].float()).reshape(q.shape)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (< 2^bits) into a dense little-endian bit stream. -> uint8 [ceil(n*bits/8)]"""
    if bits == 8:
        return q.reshape(-1).to(torch.uint8).clone()
    if bits == 4 and q.numel() % 2 == 0:  # same stream as the generic path, faster
        pairs = q.reshape(-1, 2).to(torch.uint8)
        return pairs[:, 0] | (pairs[:, 1] << 4)
    flat = q.reshape(-1).to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32, device=q.device)
    stream = ((flat[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)  # [n * bits]
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=q.device)).to(torch.uint8)
    return (stream * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_bits. -> uint8 [numel]"""
    if bits == 8:
        return packed[:numel].clone()
    if bits == 4 and numel % 2 == 0:
        return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:numel]
    dev = packed.device
    stream = (packed.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32, device=dev)) & 1
    stream = stream.reshape(-1)[: numel * bits].reshape(numel, bits)
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=dev)
    return (stream * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)
