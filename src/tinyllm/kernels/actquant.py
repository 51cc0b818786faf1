"""Activation quantization: the `ActivationQuant` record, calibration statistics and observers.

An `ActivationQuant` says how a linear layer's input is quantized at run time:
- `int8`, `token` granularity: dynamic, one symmetric scale per token computed from the token
  itself (absmax / 127).
- `int8`, `tensor` or `channel` granularity: static, scale (and zero point, when asymmetric) fixed
  from calibration. A per-channel activation scale cannot be factored out of an integer GEMM, so
  the layer folds it into its weight (W' = W diag(s)) before quantizing the weight; the integer
  codes x / s then multiply W' exactly.
- `fp8_e4m3` / `fp8_e5m2`: values rounded to the FP8 grid after scaling (dynamic per token or
  static per tensor). CPUs here have no FP8 GEMM, so FP8 layers are simulated (quantize, then a
  float matmul) and say so.

Observers turn calibration statistics into ranges: `minmax` (exact extremes over every token),
`percentile` (the p-th percentile of |x| or of each tail, from a token subsample) and `mse` (the
shrink of the min/max range that minimises the squared quantization error of the subsample).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tinyllm.errors import ConfigError

INT8_MIN, INT8_MAX = -128, 127
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
DTYPES = ("int8", *FP8_DTYPES)
GRANULARITIES = ("token", "tensor", "channel")
OBSERVERS = ("minmax", "percentile", "mse")
MIN_STATIC_TOKENS = 512  # fewer calibration tokens than this cannot fix a static range
MSE_GRID = torch.linspace(1.0, 0.2, 33)  # shrink factors of the min/max range
MSE_TOKENS = 2048  # tokens of the subsample the MSE search scores (it rounds it 33 times)


def fp8_max(dtype: str) -> float:
    return float(torch.finfo(FP8_DTYPES[dtype]).max)


def fp8_round(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round to the nearest FP8 value (saturating at the format's largest finite value)."""
    m = fp8_max(dtype)
    return x.clamp(-m, m).to(FP8_DTYPES[dtype]).float()


def token_scale(x: torch.Tensor, top: float) -> torch.Tensor:
    """One scale per row of x [m, in] mapping its absmax onto `top`. -> [m, 1]"""
    return x.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / top


@dataclass
class ActivationQuant:
    """How one linear layer's input is quantized; scale/zero are None when dynamic."""

    dtype: str = "int8"
    granularity: str = "token"
    scale: torch.Tensor | None = None  # float32 [1] (tensor) or [in] (channel)
    zero: torch.Tensor | None = None  # int32, same shape as scale; None when symmetric

    @property
    def dynamic(self) -> bool:
        return self.granularity == "token"

    def to_(self, device: torch.device) -> None:
        """Move the static scale and zero point to `device`, in place."""
        self.scale = None if self.scale is None else self.scale.to(device)
        self.zero = None if self.zero is None else self.zero.to(device)

    def quantize_int8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [m, in] float -> (codes int8 [m, in], scale to multiply the GEMM by: [m, 1] or [1]).
        For channel granularity the scale lives in the weight, so the returned one is 1."""
        if self.dynamic:
            s = token_scale(x, INT8_MAX)  # [m, 1]
            return (x / s).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), s
        q = (x / self.scale).round_()
        if self.zero is not None:
            q = q.add_(self.zero)
        q = q.clamp_(INT8_MIN, INT8_MAX).to(torch.int8)
        one = torch.ones(1, device=x.device)
        return q, one if self.granularity == "channel" else self.scale

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize then dequantize x [m, in] (the float reference of what the kernel sees)."""
        if self.dtype != "int8":
            s = self._fp8_scale(x)
            return fp8_round(x / s, self.dtype) * s
        q, s = self.quantize_int8(x)
        if self.dynamic:
            return q.float() * s
        z = 0 if self.zero is None else self.zero
        return (q.float() - z) * self.scale

    def _fp8_scale(self, x: torch.Tensor) -> torch.Tensor:
        return token_scale(x, fp8_max(self.dtype)) if self.dynamic else self.scale

    def meta(self) -> dict:
        return {"dtype": self.dtype, "granularity": self.granularity, "sym": self.zero is None}

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {} if self.scale is None else {f"{prefix}.scale": self.scale.float().contiguous()}
        if self.zero is not None:
            out[f"{prefix}.zero"] = self.zero.to(torch.int32).contiguous()
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, meta: dict
    ) -> ActivationQuant:
        return cls(
            dtype=meta["dtype"],
            granularity=meta["granularity"],
            scale=tensors.get(f"{prefix}.scale"),
            zero=tensors.get(f"{prefix}.zero"),
        )

    def describe(self) -> str:
        kind = "dynamic per-token" if self.dynamic else f"static per-{self.granularity}"
        sym = "" if self.zero is None else ", asymmetric"
        return f"{self.dtype} {kind}{sym}"


@dataclass
class ActStats:
    """What calibration saw of one layer's input: exact per-channel extremes over all tokens plus
    an evenly strided subsample of tokens (for percentile and MSE observers)."""

    step: int = 1  # keep every step-th token
    lo: torch.Tensor | None = None  # [in]
    hi: torch.Tensor | None = None  # [in]
    absmean: torch.Tensor | None = None  # sum of |x| per channel, divided by tokens on read
    tokens: int = 0
    kept: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:  # x [tokens, in]
        x = x.detach().float()
        lo, hi = x.amin(dim=0), x.amax(dim=0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        a = x.abs().sum(dim=0)
        self.absmean = a if self.absmean is None else self.absmean + a
        self.tokens += x.shape[0]
        self.kept.append(x[:: self.step].clone())

    def sample(self) -> torch.Tensor:  # [kept tokens, in]
        return torch.cat(self.kept)

    def scaled(self, s: torch.Tensor) -> ActStats:
        """The statistics of x / s (s [in] positive): what a layer sees after smoothing."""
        return ActStats(
            self.step,
            self.lo / s,
            self.hi / s,
            self.absmean / s,
            self.tokens,
            [k / s for k in self.kept],
        )


def stride_for(total_tokens: int, keep: int) -> int:
    return max(1, total_tokens // keep)


def int8_qparams(
    lo: torch.Tensor, hi: torch.Tensor, sym: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ranges -> (scale, integer zero point or None) of an int8 grid that covers [lo, hi]."""
    if sym:
        return torch.maximum(lo.abs(), hi.abs()).clamp_min(1e-8) / INT8_MAX, None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo).clamp_min(1e-8) / (INT8_MAX - INT8_MIN)
    zero = (INT8_MIN - lo / scale).round().clamp(INT8_MIN, INT8_MAX).to(torch.int32)
    return scale, zero


def _reduce(x: torch.Tensor, per_channel: bool, fn) -> torch.Tensor:
    return fn(x, 0) if per_channel else fn(x.reshape(-1), 0).reshape(1)


def percentile_range(
    sample: torch.Tensor, p: float, per_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The p-th percentile of each tail of the sample [tokens, in], per channel or per tensor."""
    n = sample.shape[0] if per_channel else sample.numel()
    k_hi = max(1, min(n, round(n * p / 100)))
    k_lo = max(1, n - k_hi + 1)

    def kth(k: int):
        return lambda t, d: t.kthvalue(k, dim=d).values

    return _reduce(sample, per_channel, kth(k_lo)), _reduce(sample, per_channel, kth(k_hi))


def mse_range(
    sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, sym: bool, dtype: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink [lo, hi] by the factor (from MSE_GRID) that minimises the squared error of the
    quantized sample [tokens, in]; lo/hi are [in] (per channel) or [1]."""
    sample = sample[:: max(1, sample.shape[0] // MSE_TOKENS)]
    best = torch.full_like(lo, float("inf"))
    best_r = torch.ones_like(lo)
    per_channel = lo.numel() > 1
    for r in MSE_GRID.tolist():
        spec = static_spec(lo * r, hi * r, sym, dtype, "channel" if per_channel else "tensor")
        d = (spec.fake(sample) - sample).pow(2)
        err = d.sum(dim=0) if per_channel else d.sum().reshape(1)
        better = err < best
        best = torch.where(better, err, best)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return lo * best_r, hi * best_r


def static_spec(
    lo: torch.Tensor, hi: torch.Tensor, sym: bool, dtype: str, granularity: str
) -> ActivationQuant:
    """An ActivationQuant covering [lo, hi]."""
    if dtype == "int8":
        scale, zero = int8_qparams(lo, hi, sym)
        return ActivationQuant("int8", granularity, scale.float(), zero)
    absmax = torch.maximum(lo.abs(), hi.abs()).clamp_min(1e-8)
    return ActivationQuant(dtype, granularity, (absmax / fp8_max(dtype)).float(), None)


def observe(
    stats: ActStats,
    observer: str,
    granularity: str,
    sym: bool,
    dtype: str = "int8",
    percentile: float = 99.99,
) -> ActivationQuant:
    """Calibration statistics -> a static ActivationQuant for granularity tensor or channel."""
    per_channel = granularity == "channel"
    lo = stats.lo if per_channel else stats.lo.amin().reshape(1)
    hi = stats.hi if per_channel else stats.hi.amax().reshape(1)
    if observer == "percentile":
        lo, hi = percentile_range(stats.sample(), percentile, per_channel)
    elif observer == "mse":
        lo, hi = mse_range(stats.sample(), lo, hi, sym, dtype)
    return static_spec(lo, hi, sym, dtype, granularity)


def check_static_calibration(tokens: int, kept: int, observer: str, granularity: str, p: float):
    """Refuse statistics too thin for the observer: say how many tokens are needed."""
    if tokens < MIN_STATIC_TOKENS:
        raise ConfigError(
            f"static activation ranges from {tokens} calibration tokens are unreliable; use at "
            f"least {MIN_STATIC_TOKENS} (more --samples or a longer --seq-len), or a dynamic "
            "method (int8-dynamic) that needs no calibration"
        )
    if observer == "percentile" and granularity == "channel":
        need = int(100 / (100 - p) + 0.5)
        if kept < need:
            raise ConfigError(
                f"the {p} percentile per channel needs at least {need} calibration tokens per "
                f"channel, got {kept}; use more --samples, a lower --percentile, or per-tensor"
            )
