"""NF4 (Dettmers et al. 2023): 4-bit NormalFloat codes with a block-wise absmax scale.

The 16 code values are quantiles of N(0, 1) normalised to [-1, 1], built asymmetrically so that 0
is represented exactly: 8 positive and 7 negative quantile midpoints plus zero (QLoRA, sec. 3).
Double quantization of the scales is not implemented yet; scales are stored as float16.
"""

from __future__ import annotations

import torch
from pydantic import field_validator
from torch import nn

from tinyllm.core.steps import Context, Step, register
from tinyllm.quant.common import quantize_each
from tinyllm.quant.primitives import grouped
from tinyllm.quant.qweight import QuantizedWeight

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
    scale = g.abs().amax(dim=-1).clamp_min(1e-10).half().float()  # [out, blocks]
    normed = g / scale[..., None]
    codes = (normed[..., None] - book).abs().argmin(dim=-1).to(torch.uint8).reshape(w.shape)
    return QuantizedWeight.from_codes(
        codes,
        scale,
        torch.zeros_like(scale),
        bits=4,
        group_size=cfg.block_size,
        sym=True,
        codebook=book,
    )


@register(NF4)
def apply(model: nn.Module, cfg: NF4, ctx: Context) -> None:
    quantize_each(model, ctx, cfg.block_size, lambda w: nf4_quantize(w, cfg))
