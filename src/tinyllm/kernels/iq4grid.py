"""Pure functions: llama.cpp's IQ4_NL grid (a non-uniform 4-bit codebook) as a tinyllm grid.

An IQ4_NL block holds 32 consecutive weights of one row as w = d * V[q]: one float16 scale d and
4-bit indices q into the fixed, non-uniform table V of 16 integers below (denser near zero, where
most weights are). In tinyllm an IQ4_NL layer is a codebook record (QuantizedWeight.codebook = V,
groups of 32, `scale` = d), so the NF4 machinery stores and dequantizes it unchanged and
`tinyllm export --type iq4_nl` carries every index and scale bit for bit.

`fit_iq4nl` chooses each block's scale by a search against the (optionally importance-weighted)
squared error: for 15 trial scales spread around the one that maps the block's largest-magnitude
weight onto V's outermost value, the weights are rounded to their nearest table entries, the scale
is refitted by weighted least squares for those indices, and the trial with the least error after
rounding the scale to float16 and re-rounding the weights to it wins.

IQ4_XS (`fit_iq4xs`) is the same table in super-blocks of 256 weights: one float16 d per
super-block and, per block of 32, a 6-bit signed multiple k in [-32, 31], so a block's scale is
d * k (4.25 bits per weight instead of 4.5). Its blocks' scales are first fitted as IQ4_NL's, then
put on the super-block's grid (d = -the largest-magnitude block scale / 32, as llama.cpp's
quantize_row_iq4_xs does), and the weights re-rounded to those scales. An IQ4_XS record is an
IQ4_NL record whose scales lie on that grid; `iq4xs_superblocks` recovers d and k from it.
Rows that are not whole super-blocks get IQ4_NL's grid, the type llama.cpp falls back to.
"""

from __future__ import annotations

import torch

IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
IQ4NL_GROUP = 32
TRIALS = 7  # trial scales on each side of the outermost-value one


def iq4nl_codebook() -> torch.Tensor:
    return torch.tensor(IQ4NL_VALUES, dtype=torch.float32)


def is_iq4nl(codebook: torch.Tensor | None, group_size: int) -> bool:
    """Whether a record's codebook and groups are IQ4_NL's."""
    return (
        codebook is not None
        and group_size == IQ4NL_GROUP
        and codebook.numel() == 16
        and bool(torch.equal(codebook.float(), iq4nl_codebook()))
    )


def nearest(x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest IQ4_NL value to each element of x (in table units)."""
    book = iq4nl_codebook()
    mids = (book[1:] + book[:-1]) / 2
    return torch.bucketize(x, mids)


def fit_iq4nl(
    w: torch.Tensor, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float (in a multiple of 32), optional [in] importance -> (indices uint8
    [out, in], scale [out, in / 32] float32 holding float16 values)."""
    rows, cols = w.shape
    if cols % IQ4NL_GROUP:
        raise ValueError(f"IQ4_NL needs input features in whole blocks of 32, got {cols}")
    book = iq4nl_codebook()
    g = w.float().reshape(rows, cols // IQ4NL_GROUP, IQ4NL_GROUP)
    a = torch.ones_like(g) if importance is None else importance.float().reshape(1, *g.shape[1:])
    a = a.expand_as(g)
    peak = g.gather(-1, g.abs().argmax(-1, keepdim=True))  # signed, [rows, blocks, 1]
    safe = torch.where(peak == 0, torch.ones_like(peak), peak)
    best_err = torch.full(g.shape[:2], torch.inf)
    best_d = torch.zeros(g.shape[:2])
    for t in range(-TRIALS, TRIALS + 1):
        inv = (t + book[0]) / safe  # table units per weight
        q = nearest(g * inv)
        v = book[q]
        d = (a * v * g).sum(-1) / (a * v * v).sum(-1).clamp_min(1e-30)
        d = d.half().float()
        dq = nearest(g / torch.where(d == 0, torch.ones_like(d), d)[..., None])
        err = (a * (g - d[..., None] * book[dq]) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better, d, best_d)
    zero = peak[..., 0] == 0
    best_d = torch.where(zero, torch.zeros_like(best_d), best_d)
    div = torch.where(best_d == 0, torch.ones_like(best_d), best_d)
    codes = nearest(g / div[..., None]).reshape(rows, cols)
    return codes.to(torch.uint8), best_d


def quantize_iq4nl_on(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Indices of w [out, in] on fixed per-block scales [out, in / 32]. -> uint8 [out, in]"""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // IQ4NL_GROUP, IQ4NL_GROUP)
    div = torch.where(scale == 0, torch.ones_like(scale), scale)
    return nearest(g / div[..., None]).reshape(rows, cols).to(torch.uint8)


IQ4XS_SUPER = 256  # weights per IQ4_XS super-block: 8 blocks of 32
IQ4XS_BLOCKS = IQ4XS_SUPER // IQ4NL_GROUP


def iq4xs_fits(cols: int) -> bool:
    return cols % IQ4XS_SUPER == 0


def on_xs_grid(scale: torch.Tensor) -> torch.Tensor:
    """Block scales [rows, blocks] (blocks a multiple of 8) put on IQ4_XS's super-block grid:
    d = float16(-peak / 32) per 8 blocks, each block's scale d * round(scale / d) in [-32, 31]."""
    rows, blocks = scale.shape
    s = scale.float().reshape(rows, blocks // IQ4XS_BLOCKS, IQ4XS_BLOCKS)
    peak = s.gather(-1, s.abs().argmax(-1, keepdim=True))
    d = (-peak / 32).half().float()
    k = (s / torch.where(d == 0, torch.ones_like(d), d)).round().clamp(-32, 31)
    return (d * k).reshape(rows, blocks)


def fit_iq4xs(
    w: torch.Tensor, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fit_iq4nl's blocks, their scales on IQ4_XS's super-block grid, the weights rounded to
    them. [out, in] (in a multiple of 256) -> (indices uint8 [out, in], scale [out, in / 32])"""
    if not iq4xs_fits(w.shape[1]):
        raise ValueError(f"IQ4_XS needs input features in whole blocks of 256, got {w.shape[1]}")
    _, scale = fit_iq4nl(w, importance)
    scale = on_xs_grid(scale)
    return quantize_iq4nl_on(w, scale), scale


def fit_codebook(
    name: str, w: torch.Tensor, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of codebook type `name` (iq4_nl, iq4_xs; IQ4_NL's for rows that are not whole
    IQ4_XS super-blocks). -> (indices, block scales)"""
    if name == "iq4_xs" and iq4xs_fits(w.shape[1]):
        return fit_iq4xs(w, importance)
    return fit_iq4nl(w, importance)


def iq4xs_superblocks(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The IQ4_XS super-blocks behind block scales [rows, blocks]: (d float16 [rows, supers],
    k int [rows, supers, 8] in [-32, 31]) with d * k equal to every scale exactly; None when the
    scales are not on that grid."""
    rows, blocks = scale.shape
    if blocks % IQ4XS_BLOCKS:
        return None
    s = scale.float().reshape(rows, blocks // IQ4XS_BLOCKS, IQ4XS_BLOCKS)
    peak = s.gather(-1, s.abs().argmax(-1, keepdim=True))  # a k = -32 block, if on the grid
    d = -peak / 32
    if not torch.equal(d.half().float(), d):
        return None
    k = (s / torch.where(d == 0, torch.ones_like(d), d)).round()
    if not torch.equal(d * k, s) or k.min() < -32 or k.max() > 31:
        return None
    return d[..., 0].half(), k.to(torch.int64)
