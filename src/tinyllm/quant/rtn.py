"""RTN: round every weight to the nearest point of its group's grid."""

from __future__ import annotations

import torch
from torch import nn

from tinyllm.core.steps import Context, register
from tinyllm.kernels.iq4grid import fit_codebook
from tinyllm.kernels.kgrid import derive, fit_kgrid, kspec, quantize_on
from tinyllm.kernels.primitives import group_qparams, quantize_codes
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.quant.common import WeightQuant, layer_cfg, quantize_each_layer


class RTN(WeightQuant):
    mse: bool = False  # search a clipping range per group instead of min/max


def rtn_quantize(w: torch.Tensor, cfg: RTN) -> QuantizedWeight:
    """[out, in] float -> QuantizedWeight on a min/max (or MSE-clipped) grid; under `kquant` on
    that K type's searched super-block grid, under `codebook` on IQ4_NL's table (IQ4_XS: its
    blocks' scales on a super-block grid)."""
    if cfg.codebook is not None:
        return QuantizedWeight.from_iq4nl(*fit_codebook(cfg.codebook, w))
    if cfg.kquant is not None:
        spec = kspec(cfg.kquant)
        superblock = fit_kgrid(w, spec)
        codes = quantize_on(w, *derive(superblock, spec), spec)
        return QuantizedWeight.from_kquant(codes, cfg.kquant, superblock)
    scale, zero = group_qparams(w, cfg.bits, cfg.group_size, cfg.sym, mse=cfg.mse)
    scale = scale.half().float()  # quantize against the scale that is stored
    codes = quantize_codes(w, scale, zero, cfg.bits, cfg.group_size)
    return QuantizedWeight.from_codes(
        codes, scale, zero, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym
    )


@register(RTN)
def apply(model: nn.Module, cfg: RTN, ctx: Context) -> None:
    quantize_each_layer(
        model,
        ctx,
        cfg.group_size,
        lambda w, name: rtn_quantize(w, layer_cfg(cfg, name, ctx.layer_bits, w.shape[1])),
    )
