"""NF4 (Dettmers et al. 2023): 4-bit NormalFloat codes with a block-wise absmax scale.

The 16 code values are quantiles of N(0, 1) normalised to [-1, 1], built asymmetrically so that 0
is represented exactly: 8 positive and 7 negative quantile midpoints plus zero (QLoRA, sec. 3).
With `double_quant` (default) the block scales are themselves quantized (QLoRA sec. 3): their mean
is subtracted and they are stored as int8 with one absmax per 256 scales (the paper uses an FP8
grid here; we use an 8-bit integer grid): 8.1 bits per scale instead of 16.
"""

from __future__ import annotations

import torch
from pydantic import field_validator
from torch import nn

from tinyllm.core.steps import Context, Step, register
from tinyllm.kernels.primitives import grouped
from tinyllm.kernels.qweight import QuantizedWeight, dequantize_scales, double_quantize_scales
from tinyllm.quant.common import quantize_each

NF4_OFFSET = 0.5 * (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16))  # outermost quantile probability


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values, ascending, from -1 to 1 with an exact 0."""
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (values / values.abs().max()).float()


class NF4(Step):
    block_size: int = 64
    double_quant: bool = True

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v not in (32, 64, 128):
            raise ValueError(f"block_size must be 32, 64 or 128, got {v}")
        return v


def nf4_quantize(w: torch.Tensor, cfg: NF4) -> QuantizedWeight:
    """[out, in] -> codes of the nearest NF4 value after dividing each block by its absmax."""
    book = nf4_codebook()
    g = grouped(w.float(), cfg.block_size)  # [out, blocks, bs]
    absmax = g.abs().amax(dim=-1).clamp_min(1e-10)  # [out, blocks]
    dq = double_quantize_scales(absmax) if cfg.double_quant else None
    scale = dequantize_scales(dq).reshape(absmax.shape) if dq else absmax.half().float()
    normed = g / scale[..., None]  # codes against the scale that is stored
    codes = (normed[..., None] - book).abs().argmin(dim=-1).to(torch.uint8).reshape(w.shape)
    qw = QuantizedWeight.from_codes(
        codes,
        scale,
        torch.zeros_like(scale),
        bits=4,
        group_size=cfg.block_size,
        sym=True,
        codebook=book,
    )
    if dq is not None:
        qw.scale, qw.scale_dq = scale.contiguous(), dq  # exact values, not rounded to float16
    return qw


@register(NF4)
def apply(model: nn.Module, cfg: NF4, ctx: Context) -> None:
    quantize_each(model, ctx, cfg.block_size, lambda w: nf4_quantize(w, cfg))
