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


D_FACTORS = (1.0, 0.96, 1.04, 0.92, 1.08)  # candidate super-block factors around the maximum's


def _factor(values: torch.Tensor, spec: KSpec, f: float) -> torch.Tensor:
    """The float16 factor of sub-block values [..., subs] with its extreme value mapped to the
    end of the integer range (llama.cpp's), times f. -> float32 [...] (float16 values)"""
    lo, hi = spec.sc_range
    if spec.signed:  # the value of largest magnitude maps to the negative end
        idx = values.abs().argmax(-1, keepdim=True)
        return (values.gather(-1, idx)[..., 0] * f / lo).half().float()
    return (values.amax(-1) * f / hi).half().float()


def _choices(values: torch.Tensor, factor: torch.Tensor, spec: KSpec) -> list[torch.Tensor]:
    """Floor and ceiling of values / factor in the integer range. [..., subs] each"""
    lo, hi = spec.sc_range
    f = factor[..., None]
    ratio = torch.where(f == 0, torch.zeros_like(values), values / torch.where(f == 0, 1, f))
    return [ratio.floor().clamp(lo, hi), ratio.ceil().clamp(lo, hi)]


def _sub_error(g, a, scale, offset, spec: KSpec) -> torch.Tensor:
    """Weighted squared error of rounding g [..., subs, sub] onto sub-block grids [..., subs]."""
    s = torch.where(scale == 0, torch.full_like(scale, 1e-30), scale)[..., None]
    q = ((g + offset[..., None]) / s + spec.zero).round().clamp(0, (1 << spec.bits) - 1)
    return (a * ((q - spec.zero) * scale[..., None] - offset[..., None] - g) ** 2).sum(-1)


def _fit_super(g, a, s, m, spec: KSpec) -> dict[str, torch.Tensor]:
    """Quantize the searched sub-block scales s (and mins m) [rows, supers, subs] onto one
    float16 factor per super-block times integers: a few factors around llama.cpp's are tried,
    and each sub-block takes the floor or ceiling integer (scale and min) whose rounding of
    its weights g [rows, supers, subs, sub] has the least error weighted by a."""
    best_err = torch.full(s.shape[:-1], float("inf"))
    out: dict[str, torch.Tensor] = {}
    dmin = None if spec.signed else _factor(m, spec, 1.0)
    mns = [torch.zeros_like(s)] if spec.signed else _choices(m, dmin, spec)
    for f in D_FACTORS:
        d = _factor(s, spec, f)
        err, sc, mn = None, None, None
        for sc_c in _choices(s, d, spec):
            for mn_c in mns:
                off = mn_c * (0 if dmin is None else dmin[..., None])
                e = _sub_error(g, a, d[..., None] * sc_c, off, spec)
                if err is None:
                    err, sc, mn = e, sc_c, mn_c
                else:
                    better = e < err
                    err = torch.where(better, e, err)
                    sc, mn = torch.where(better, sc_c, sc), torch.where(better, mn_c, mn)
        total = err.sum(-1)
        take = total < best_err
        best_err = torch.where(take, total, best_err)
        for key, value in (("d", d), ("sc", sc), ("mn", mn)):
            ref = out.get(key, value)
            mask = take if value.dim() == take.dim() else take[..., None]
            out[key] = torch.where(mask, value, ref)
    params = {"d": out["d"].half(), "sc": out["sc"].to(torch.int16)}
    if not spec.signed:
        params |= {"dmin": dmin.half(), "mn": out["mn"].to(torch.int16)}
    return params


def fit_kgrid(
    w: torch.Tensor, spec: KSpec, importance: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The K-quant super-block parameters for weight w [rows, cols] (cols a multiple of 256):
    {"d": float16 [rows, cols/256], "sc": int16 [rows, cols/sub]} plus "dmin" and "mn" for the
    unsigned types. Sub-block grids are searched against the squared error weighted by
    `importance` [cols] (the inputs' mean square, diag H: the output error's diagonal part),
    then quantized onto the super-block structure against the same error."""
    rows, cols = w.shape
    if why_not_fits(cols):
        raise ValueError(why_not_fits(cols))
    g = w.float().reshape(rows, cols // spec.sub, spec.sub)
    a = torch.ones(cols) if importance is None else importance.float().clamp_min(0) + 1e-12
    a = a.reshape(1, cols // spec.sub, spec.sub).expand_as(g)
    if spec.signed:
        s, m = _search_signed(g, a, spec), None
    else:
        s, m = _search_unsigned(g, a, spec)
    shape = (rows, cols // SUPER, SUPER // spec.sub)
    m = torch.zeros(shape) if m is None else m.reshape(shape)
    params = _fit_super(g.reshape(*shape, -1), a.reshape(*shape, -1), s.reshape(shape), m, spec)
    params["sc"] = params["sc"].reshape(rows, -1)
    if "mn" in params:
        params["mn"] = params["mn"].reshape(rows, -1)
    return params


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
