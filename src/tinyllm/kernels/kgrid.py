"""Pure functions: llama.cpp's K-quant grids (Q2_K..Q6_K) as tinyllm quantization grids.

A K-quant row is cut into super-blocks of 256 weights, each cut into sub-blocks of 16 or 32.
Every sub-block j has its own grid, but its scale (and min) is itself quantized against one
float16 factor per super-block:
  unsigned types (Q2_K, Q4_K, Q5_K)   w = (d * sc_j) * q - dmin * mn_j    q in [0, 2^b - 1]
  signed types   (Q3_K, Q6_K)         w = (d * sc_j) * (q - 2^(b-1))      sc_j signed
with sc_j, mn_j integers of `sc_bits` bits and d, dmin float16. `fit_kgrid` chooses the
sub-block grids by a search against the (optionally importance-weighted) squared error, then
quantizes them onto that two-level structure; `derive` gives each sub-block's exact float32
scale and offset, computed in the order ggml's dequantization computes them, so a record built
on these grids dequantizes bit for bit as llama.cpp does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPER = 256  # weights per super-block, every K type
SEARCH = torch.linspace(1.0, 0.6, 21)  # candidate range shrink factors for the sub-block search


@dataclass(frozen=True)
class KSpec:
    """One K-quant type: code bits, sub-block width, bits of each sub-block scale (and min)."""

    name: str
    bits: int
    sub: int
    sc_bits: int
    signed: bool  # signed sub-block scales around code 2^(bits-1), no min (Q3_K, Q6_K)

    @property
    def zero(self) -> int:
        return 1 << (self.bits - 1) if self.signed else 0

    @property
    def sc_range(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.sc_bits - 1)), (1 << (self.sc_bits - 1)) - 1
        return 0, (1 << self.sc_bits) - 1

    @property
    def bpw(self) -> float:
        """Bits per weight of the ggml block (codes, sub-block scales/mins, float16 factors)."""
        per_sub = self.sc_bits * (1 if self.signed else 2)
        supers = 16 * (1 if self.signed else 2)
        return self.bits + per_sub / self.sub + supers / SUPER


KSPECS: dict[str, KSpec] = {
    "q2_k": KSpec("q2_k", 2, 16, 4, False),
    "q3_k": KSpec("q3_k", 3, 16, 6, True),
    "q4_k": KSpec("q4_k", 4, 32, 6, False),
    "q5_k": KSpec("q5_k", 5, 32, 6, False),
    "q6_k": KSpec("q6_k", 6, 16, 8, True),
}


def kspec(name: str) -> KSpec:
    if name not in KSPECS:
        raise ValueError(f"unknown K-quant type '{name}'; choose one of {', '.join(KSPECS)}")
    return KSPECS[name]


def why_not_fits(cols: int) -> str | None:
    """None when rows of `cols` weights cut into K super-blocks, else the reason."""
    if cols % SUPER:
        return f"{cols} input features are not a multiple of the K super-block ({SUPER})"
    return None


def _wls_unsigned(w, a, q):
    """Weighted least squares w ~ s * q - m per sub-block, with s >= 0 and m >= 0.
    [..., sub] each -> (s, m) [...]"""
    sa, sq, sw = a.sum(-1), (a * q).sum(-1), (a * w).sum(-1)
    sqq, sqw = (a * q * q).sum(-1), (a * q * w).sum(-1)
    det = sa * sqq - sq * sq
    s = (sa * sqw - sq * sw) / det.clamp_min(1e-30)
    m = (s * sq - sw) / sa.clamp_min(1e-30)
    no_min = (m < 0) | (det <= 0)  # the sub-block is all positive: no offset
    s = torch.where(no_min, sqw / sqq.clamp_min(1e-30), s)
    m = torch.where(no_min, torch.zeros_like(m), m)
    return s.clamp_min(0), m


def _search_unsigned(w: torch.Tensor, a: torch.Tensor, spec: KSpec):
    """Per sub-block (s, m) minimizing sum a (w - (s q - m))^2 over shrunk ranges, each refit
    by least squares on its codes. w, a [..., sub] -> (s, m) [...]"""
    top = (1 << spec.bits) - 1
    lo, hi = w.amin(-1).clamp_max(0), w.amax(-1)
    best = (torch.full_like(lo, float("inf")), torch.zeros_like(lo), torch.zeros_like(lo))
    for t in SEARCH.tolist():
        s = ((hi - lo) * t / top).clamp_min(1e-30)
        m = -lo * t
        q = ((w + m[..., None]) / s[..., None]).round().clamp(0, top)
        s, m = _wls_unsigned(w, a, q)
        q = ((w + m[..., None]) / s.clamp_min(1e-30)[..., None]).round().clamp(0, top)
        err = (a * (s[..., None] * q - m[..., None] - w) ** 2).sum(-1)
        better = err < best[0]
        best = tuple(
            torch.where(better, new, old) for new, old in zip((err, s, m), best, strict=True)
        )
    return best[1], best[2]


def _search_signed(w: torch.Tensor, a: torch.Tensor, spec: KSpec) -> torch.Tensor:
    """Per sub-block signed scale s minimizing sum a (w - s c)^2, c in [-z, z - 1], the signed
    extreme mapping to -z (so it is never clipped). w, a [..., sub] -> s [...]"""
    z = spec.zero
    idx = w.abs().argmax(-1, keepdim=True)
    extreme = w.gather(-1, idx)[..., 0]
    best_err, best_s = torch.full_like(extreme, float("inf")), torch.zeros_like(extreme)
    for t in SEARCH.tolist():
        s = -extreme * t / z
        s = torch.where(s.abs() < 1e-30, torch.full_like(s, 1e-30), s)
        c = (w / s[..., None]).round().clamp(-z, z - 1)
        cc = (a * c * c).sum(-1)
        s = torch.where(cc > 0, (a * c * w).sum(-1) / cc.clamp_min(1e-30), s)
        s = torch.where(s.abs() < 1e-30, torch.full_like(s, 1e-30), s)
        c = (w / s[..., None]).round().clamp(-z, z - 1)
        err = (a * (s[..., None] * c - w) ** 2).sum(-1)
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    return best_s


def _super_factor(values: torch.Tensor, spec: KSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize sub-block values [rows, supers, subs] onto one float16 factor per super-block
    times sc_bits integers (llama.cpp's construction: the largest maps to the end of the
    integer range). -> (factor float16 [rows, supers], integers int16 [rows, supers, subs])"""
    lo, hi = spec.sc_range
    if spec.signed:  # the value of largest magnitude maps to the negative end
        idx = values.abs().argmax(-1, keepdim=True)
        factor = values.gather(-1, idx)[..., 0] / lo
    else:
        factor = values.amax(-1) / hi
    factor = factor.half()
    f = factor.float()[..., None]
    safe = torch.where(f == 0, torch.ones_like(f), f)
    ints = torch.where(f == 0, torch.zeros_like(values), (values / safe).round()).clamp(lo, hi)
    return factor, ints.to(torch.int16)


def fit_kgrid(
    w: torch.Tensor, spec: KSpec, importance: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The K-quant super-block parameters for weight w [rows, cols] (cols a multiple of 256):
    {"d": float16 [rows, cols/256], "sc": int16 [rows, cols/sub]} plus "dmin" and "mn" for the
    unsigned types. Sub-block grids are searched against the squared error weighted by
    `importance` [cols] (the inputs' mean square, diag H: the output error's diagonal part)."""
    rows, cols = w.shape
    if why_not_fits(cols):
        raise ValueError(why_not_fits(cols))
    g = w.float().reshape(rows, cols // spec.sub, spec.sub)
    a = torch.ones(cols) if importance is None else importance.float().clamp_min(0) + 1e-12
    a = a.reshape(1, cols // spec.sub, spec.sub).expand_as(g)
    shape = (rows, cols // SUPER, SUPER // spec.sub)
    if spec.signed:
        d, sc = _super_factor(_search_signed(g, a, spec).reshape(shape), spec)
        return {"d": d, "sc": sc.reshape(rows, -1)}
    s, m = _search_unsigned(g, a, spec)
    d, sc = _super_factor(s.reshape(shape), spec)
    dmin, mn = _super_factor(m.reshape(shape), spec)
    return {"d": d, "sc": sc.reshape(rows, -1), "dmin": dmin, "mn": mn.reshape(rows, -1)}


def derive(params: dict[str, torch.Tensor], spec: KSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 sub-block scale and offset [rows, cols/sub] of K parameters, so that
    w = scale * (q - zero) - offset is ggml's dequantization bit for bit."""
    rep = SUPER // spec.sub
    scale = params["d"].float().repeat_interleave(rep, dim=1) * params["sc"].float()
    if spec.signed:
        return scale, torch.zeros_like(scale)
    offset = params["dmin"].float().repeat_interleave(rep, dim=1) * params["mn"].float()
    return scale, offset


def quantize_on(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: KSpec):
    """Round w [rows, cols] to the nearest codes of given sub-block grids. -> uint8 codes"""
    rows, cols = w.shape
    s, z = working_grid(scale, offset, spec)
    g = w.float().reshape(rows, -1, spec.sub)
    q = (g / s[..., None] + z[..., None]).round()
    return q.clamp(0, (1 << spec.bits) - 1).to(torch.uint8).reshape(rows, cols)


def working_grid(
    scale: torch.Tensor, offset: torch.Tensor, spec: KSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, float zero) with s * (q - z) = scale * (q - zero) - offset, for a rounding loop
    of the form q = round(w / s + z) (GPTQ's). A zero scale (sc = 0) becomes one a million
    times below its offset, so z stays finite and s * (q - z) stays within 1e-4 of -offset.
    [rows, groups] each"""
    tiny = offset.abs().clamp_min(1e-20) * 1e-6
    s = torch.where(scale == 0, tiny, scale)
    return s, spec.zero + offset / s
