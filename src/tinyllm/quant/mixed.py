"""Mixed precision: a bit width per block linear, from measured sensitivity, under a budget.

1. Sensitivity is measured, not guessed: for every block linear and every offered width, that one
   layer alone is quantized with RTN on the base's grid (its group size and symmetry, and its
   clipping search when the base is RTN itself; for GPTQ and AWQ bases RTN is a fast stand-in that
   ranks layers the same way) and the mean KL(float || quantized) of the next-token distribution
   is measured on `sensitivity_samples` calibration windows cut to `sensitivity_seq_len` tokens.
   The float model's log-probabilities and every block's float inputs are computed once; each
   measurement re-runs only the layer's block and the blocks after it.
2. Allocation: the widths that minimise the summed sensitivities with the budget met (a
   multiple-choice knapsack, solved exactly by dynamic programming over the cost above each
   layer's narrowest width). Layers are assumed independent, the usual additive model.
3. Quantization: the base quantizer runs once with `Context.layer_bits` set, so RTN, GPTQ and AWQ
   quantize every layer at its own width. The base's own `bits` is not used for any layer.

The budget is either `avg_bits`, the parameter-weighted mean code width over the block linears,
or `size_mb`, their storage in MiB with scales and zero points, as QuantizedWeight.storage_bits
counts it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from functools import reduce

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from tinyllm.core.calib import block_inputs, run_block
from tinyllm.core.kernels import OneDNNLinear, fast_linears, onednn_available
from tinyllm.core.steps import Context, Step, apply_step, register
from tinyllm.errors import ConfigError
from tinyllm.kernels.primitives import SUPPORTED_BITS
from tinyllm.models.anatomy import LinearSite, analyze
from tinyllm.quant.awq import AWQ
from tinyllm.quant.common import WeightQuant, check_divisible, target_linears
from tinyllm.quant.gptq import GPTQ
from tinyllm.quant.rtn import RTN, rtn_quantize
from tinyllm.util import dist
from tinyllm.util.progress import make_progress

log = logging.getLogger(__name__)

TOKENS_PER_BATCH = 1024  # sensitivity windows per forward, up to this many tokens
MAX_STATES = 1 << 17  # budget resolution of the allocation table (coarser costs beyond)


class Mixed(Step):
    """Per-layer bit widths from measured sensitivity under a budget, then the base quantizer."""

    calibrated = True
    base: RTN | GPTQ | AWQ = Field(default_factory=lambda: RTN(bits=4, group_size=64))
    bits: list[int] = Field(default_factory=lambda: [3, 4, 8])  # candidate widths
    avg_bits: float | None = None  # budget: parameter-weighted mean code width
    size_mb: float | None = None  # budget: MiB of the block linears with scales and zeros
    sensitivity_samples: int = 2  # calibration windows the sensitivities are measured on
    sensitivity_seq_len: int = 128  # tokens of each of those windows (their first tokens)
    # a saved allocation (layer -> bits, e.g. from `tinyllm plan`) replayed instead of measuring
    allocation: dict[str, int] | None = None

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("bits must offer at least one width, e.g. [3, 4, 8]")
        bad = [b for b in v if b not in SUPPORTED_BITS]
        if bad:
            raise ValueError(f"bits must be among {SUPPORTED_BITS}, got {bad}")
        return sorted(set(v))

    @field_validator("sensitivity_samples", "sensitivity_seq_len")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        least = 2 if info.field_name == "sensitivity_seq_len" else 1
        if v < least:
            raise ValueError(f"{info.field_name} must be at least {least}, got {v}")
        return v

    @model_validator(mode="after")
    def _budget(self) -> Mixed:
        if grid_of(self.base).kquant is not None:
            raise ValueError(
                "mixed precision over K-quant grids is not supported yet: give the base a plain "
                "grid (no kquant / --gguf-compatible q*_k)"
            )
        if self.allocation is not None:
            bad = sorted({b for b in self.allocation.values() if b not in self.bits})
            if bad:
                raise ValueError(f"allocation uses widths {bad} not offered in bits {self.bits}")
            if self.avg_bits is not None or self.size_mb is not None:
                raise ValueError("an allocation replaces the budget: drop avg_bits / size_mb")
            return self
        if (self.avg_bits is None) == (self.size_mb is None):
            raise ValueError(
                "give exactly one budget: avg_bits (mean bits per weight, e.g. 3.5) or size_mb "
                "(MiB of the quantized block linears)"
            )
        if self.size_mb is not None and self.size_mb <= 0:
            raise ValueError(f"size_mb must be positive, got {self.size_mb}")
        low = self.bits[0]
        if self.avg_bits is not None and self.avg_bits < low:
            raise ValueError(
                f"avg_bits {self.avg_bits} is below the smallest width offered ({low}): raise "
                f"avg_bits to at least {low} or offer a smaller width in bits (one of "
                f"{[b for b in SUPPORTED_BITS if b < low]})"
            )
        return self


def grid_of(base: RTN | GPTQ | AWQ) -> RTN | GPTQ:
    """The quantizer whose width varies per layer (AWQ's own base)."""
    return base.base if isinstance(base, AWQ) else base


# --- costs and budget -------------------------------------------------------------------------


def storage_bits(out_f: int, in_f: int, bits: int, group_size: int, sym: bool) -> int:
    """QuantizedWeight.storage_bits of an affine grid: codes, float16 scales, zeros if asym."""
    groups = out_f * (1 if group_size == -1 else in_f // group_size)
    return out_f * in_f * bits + groups * 16 + (0 if sym else groups * bits)


def cost_table(sites: list[LinearSite], cfg: Mixed, grid: WeightQuant) -> torch.Tensor:
    """Budget cost of every layer at every width, in bits. -> int64 [layers, widths]"""
    rows = []
    for s in sites:
        out_f, in_f = s.module.out_features, s.module.in_features
        if cfg.size_mb is not None:
            rows.append([storage_bits(out_f, in_f, b, grid.group_size, grid.sym) for b in cfg.bits])
        else:
            rows.append([out_f * in_f * b for b in cfg.bits])
    return torch.tensor(rows, dtype=torch.int64)


def budget_bits(cfg: Mixed, sites: list[LinearSite], cost: torch.Tensor) -> int:
    """The budget in the units of cost_table; ConfigError when even the narrowest width is over."""
    if cfg.avg_bits is not None:
        params = sum(s.module.in_features * s.module.out_features for s in sites)
        return math.floor(cfg.avg_bits * params + 1e-6)
    budget = math.floor(cfg.size_mb * 8 * 2**20 + 1e-6)
    least = int(cost[:, 0].sum())
    if budget < least:
        mib = least / (8 * 2**20)
        raise ConfigError(
            f"size_mb {cfg.size_mb} is below the smallest size reachable: {mib:.4g} MiB with "
            f"every block linear at {cfg.bits[0]} bits (scales and zero points included); raise "
            f"size_mb to at least {mib:.4g} or offer a smaller width in bits"
        )
    return budget


# --- allocation -------------------------------------------------------------------------------


def allocate(
    loss: torch.Tensor, cost: torch.Tensor, budget: int, max_states: int = MAX_STATES
) -> torch.Tensor:
    """Multiple-choice knapsack: one option per layer, minimising the summed loss with the summed
    cost at most `budget`. loss [layers, options] float, cost [layers, options] int -> [layers]
    option index. Exact (dynamic programming over the cost above each layer's cheapest option,
    in units of the costs' greatest common divisor) unless that table would exceed `max_states`;
    then costs are rounded up to a coarser unit, which keeps the budget but may miss the optimum.
    Ties go to the costlier option (more bits never hurt)."""
    cost = cost.long()
    base = cost.min(dim=1).values
    extra = cost - base[:, None]  # [layers, options]
    room = budget - int(base.sum())
    if room < 0:
        raise ValueError(f"budget {budget} is below the cheapest choice {int(base.sum())}")
    room = min(room, int(extra.max(dim=1).values.sum()))
    unit = reduce(math.gcd, extra.flatten().tolist(), 0) or 1
    unit = max(unit, math.ceil(room / max_states))
    steps = -(-extra // unit)  # ceil: a coarse unit never lets the true cost past the budget
    cap = room // unit
    best, choice = _knapsack(loss.double(), steps, cap)
    picks = torch.empty(loss.shape[0], dtype=torch.long)
    c = cap
    for i in reversed(range(loss.shape[0])):
        picks[i] = int(choice[i, c])
        c -= int(steps[i, picks[i]])
    log.debug("allocation: summed loss %.6g", best)
    return picks


def _knapsack(loss: torch.Tensor, steps: torch.Tensor, cap: int) -> tuple[float, torch.Tensor]:
    """dp[c] = least summed loss of the layers so far with extra cost at most c.
    -> (optimum, choice [layers, cap + 1] option index)"""
    layers, options = loss.shape
    dp = torch.zeros(cap + 1, dtype=torch.float64)
    choice = torch.empty(layers, cap + 1, dtype=torch.uint8)  # at most 5 widths
    for i in range(layers):
        order = torch.argsort(steps[i], descending=True, stable=True)  # ties: costlier first
        cand = torch.full((options, cap + 1), math.inf, dtype=torch.float64)
        for row, k in enumerate(order.tolist()):
            w = int(steps[i, k])
            if w <= cap:
                cand[row, w:] = dp[: cap + 1 - w] + loss[i, k]
        dp, rows = cand.min(dim=0)
        choice[i] = order[rows]
    return float(dp[cap]), choice


# --- sensitivity ------------------------------------------------------------------------------


def probe_config(grid: RTN | GPTQ, bits: int, exact: bool) -> RTN:
    """The RTN grid one layer is quantized on to measure its sensitivity at `bits`."""
    return RTN(bits=bits, group_size=grid.group_size, sym=grid.sym, mse=exact and grid.mse)


def kl_from_delta(p: torch.Tensor, d: torch.Tensor) -> float:
    """Summed KL(p || softmax(log p + d)) over positions from the change d of the logits:
    log E_p[exp d] - E_p[d], accurate where d is small. [..., V], [..., V] -> float"""
    p, d = p.reshape(-1, p.shape[-1]), d.reshape(-1, d.shape[-1])  # [positions, V]
    lse = torch.log1p(torch.einsum("tv,tv->t", p, torch.expm1(d)))
    bad = ~torch.isfinite(lse)
    if bad.any():  # a huge change: the plain log-sum-exp
        lse[bad] = torch.logsumexp(d[bad] + p[bad].log(), dim=-1)
    return float((lse - torch.einsum("tv,tv->t", p, d)).clamp_min(0).double().sum())


def _tail_modules(model: nn.Module, batch: torch.Tensor, last_out: torch.Tensor) -> list | None:
    """The modules run between the last block and the head (the final norm), found by watching
    one forward, or None when they do not reproduce the model's logits from the last block's
    output (then measurements run the whole model)."""
    anatomy = analyze(model)
    inside = {id(m) for b in anatomy.blocks for m in b.modules()}
    inside |= {id(anatomy.head), id(anatomy.embedding)}
    seen: list[nn.Module] = []
    after = [False]

    def record(mod: nn.Module, args: tuple, out: object) -> None:
        if after[0]:
            seen.append(mod)

    hooks = [anatomy.blocks[-1].register_forward_hook(lambda *a: after.__setitem__(0, True))]
    hooks.append(anatomy.head.register_forward_pre_hook(lambda *a: after.__setitem__(0, False)))
    for m in model.modules():
        if id(m) not in inside and not list(m.children()):
            hooks.append(m.register_forward_hook(record))
    try:
        logits = model(input_ids=batch, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    x = last_out
    for m in seen:
        x = m(x)
    err = float((anatomy.head(x) - logits).abs().max())
    return seen if err <= 1e-3 * float(logits.abs().max()) else None


class SensitivityProbe:
    """The float model's next-token distribution and every block's inputs on the probe windows,
    cached once, so that a layer's sensitivity costs a forward from its own block on."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, windows: torch.Tensor) -> None:
        n, length = windows.shape
        fits = [d for d in range(1, n + 1) if n % d == 0 and d * length <= TOKENS_PER_BATCH]
        per = max(fits or [1])  # equal batches: the blocks' kwargs are captured on the first
        self.model, self.batches = model, list(windows.split(per))
        self.tokens, self.positions = per * length, windows.numel()
        self.anatomy = analyze(model)
        self.inputs, self.kwargs = block_inputs(model, self.batches)
        self.tail = _tail_modules(model, self.batches[0], self.inputs[-1][0])
        if self.tail is None:
            log.warning("mixed: ops after the last block not found; measuring with full forwards")
            self.ref = [model(input_ids=b, use_cache=False).logits.float() for b in self.batches]
        else:  # the final hidden states: logit changes are head(z - z_ref), exactly
            self.ref = [self._final(x) for x in self.inputs[-1]]
        head = self.anatomy.head
        fast = onednn_available() and type(head) is nn.Linear and head.weight.dtype == torch.float32
        self.head = OneDNNLinear(head, self.tokens) if fast else head
        self.p = [F.softmax(self._logits(r), dim=-1) for r in self.ref]  # [B, L, V]

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.tail:
            x = m(x)
        return x

    def _logits(self, ref: torch.Tensor) -> torch.Tensor:
        return ref if self.tail is None else self.head(ref).float()

    def _delta(self, block: int, j: int) -> torch.Tensor:
        """Change of the logits of batch j. -> [B, L, V]"""
        if self.tail is None:
            logits = self.model(input_ids=self.batches[j], use_cache=False).logits
            return logits.float() - self.ref[j]
        x = self.inputs[block][j]
        for k in range(block, len(self.anatomy.blocks)):
            x = run_block(self.anatomy.blocks[k], x, self.kwargs[k])
        d = self.head(self._final(x) - self.ref[j])
        return d if self.head.bias is None else d - self.head.bias

    def kl(self, block: int) -> float:
        """Mean KL(float || current model) per position, the current weights differing from the
        float model's only in block `block` and the blocks after it."""
        total = sum(kl_from_delta(self.p[j], self._delta(block, j)) for j in range(len(self.p)))
        return total / self.positions


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    sites: list[LinearSite],
    windows: torch.Tensor,
    bits: list[int],
    quantizer: Callable[[torch.Tensor, int], torch.Tensor],
) -> dict[str, dict[int, float]]:
    """KL(float || model) with only one layer quantized by quantizer(weight, bits) -> dequantized
    weight, for every layer and width: {layer name: {bits: mean KL per position}}."""
    was_training = model.training
    model.eval()
    probe = SensitivityProbe(model, windows)
    out: dict[str, dict[int, float]] = {}
    stacks = [contextlib.ExitStack() for _ in probe.anatomy.blocks]
    try:
        for block, stack in zip(probe.anatomy.blocks, stacks, strict=True):
            stack.enter_context(fast_linears(block, probe.tokens))  # blocks after the layer's
        with make_progress() as bar:
            task = bar.add_task("sensitivity", total=len(sites) * len(bits), info="")
            for s in sites:
                stacks[s.block].close()  # the perturbed block runs on its plain linears
                w = s.module.weight.data
                out[s.name] = {}
                for b in bits:
                    s.module.weight.data = quantizer(w, b).to(w.dtype)
                    try:
                        out[s.name][b] = max(probe.kl(s.block), 0.0)
                    finally:
                        s.module.weight.data = w
                    bar.update(task, advance=1, info=f"{s.name} {b} bits")
    finally:
        for stack in stacks:
            stack.close()
        model.train(was_training)
    return out


# --- the step ---------------------------------------------------------------------------------


def _loss_table(sens: dict[str, dict[int, float]], sites: list[LinearSite], bits: list[int]):
    """[layers, widths] sensitivities, made non-increasing in width (a wider grid measuring
    worse than a narrower one is noise of the probe windows)."""
    table = torch.tensor([[sens[s.name][b] for b in bits] for s in sites], dtype=torch.float64)
    return table.cummin(dim=1).values


def _windows(ctx: Context, cfg: Mixed) -> torch.Tensor:
    """The first calibration windows, cut. Under several processes ctx.calib is this rank's
    share: the windows are gathered back, and every rank measures the same sensitivities."""
    calib = dist.unshard(ctx.calib)
    n = min(cfg.sensitivity_samples, calib.shape[0])
    if n < cfg.sensitivity_samples:
        log.warning("mixed: only %d calibration windows for the sensitivities", n)
    return calib[:n, : cfg.sensitivity_seq_len]


@register(Mixed)
def apply(model: nn.Module, cfg: Mixed, ctx: Context) -> None:
    grid = grid_of(cfg.base)
    sites = target_linears(model)
    check_divisible(sites, grid.group_size)
    if cfg.allocation is not None:
        allocation = _replay(ctx, cfg, sites)
    else:
        cost = cost_table(sites, cfg, grid)
        budget = budget_bits(cfg, sites, cost)
        t0 = time.perf_counter()
        exact = isinstance(cfg.base, RTN)

        def quantizer(w: torch.Tensor, bits: int) -> torch.Tensor:
            return rtn_quantize(w.float(), probe_config(grid, bits, exact)).dequantize()

        sens = measure_sensitivity(model, sites, _windows(ctx, cfg), cfg.bits, quantizer)
        seconds = time.perf_counter() - t0
        picks = allocate(_loss_table(sens, sites, cfg.bits), cost, budget)
        allocation = {s.name: cfg.bits[int(k)] for s, k in zip(sites, picks, strict=True)}
        _report(ctx, cfg, sites, allocation, sens, cost, picks, seconds)
    del sites  # a site holds its linear: the base must be able to free each one it swaps out
    previous = ctx.layer_bits
    ctx.layer_bits = {**previous, **allocation}
    try:
        apply_step(model, cfg.base, ctx)
    finally:
        ctx.layer_bits = previous


def _replay(ctx: Context, cfg: Mixed, sites: list[LinearSite]) -> dict[str, int]:
    """A given allocation, checked: it must name exactly the model's block linears."""
    names = {s.name for s in sites}
    missing, unknown = names - set(cfg.allocation), set(cfg.allocation) - names
    if missing or unknown:
        raise ConfigError(
            f"mixed: the allocation does not match this model's block linears (missing "
            f"{sorted(missing)[:3]}, unknown {sorted(unknown)[:3]}); plan it for this model"
        )
    params = {s.name: s.module.in_features * s.module.out_features for s in sites}
    ctx.report["bit_allocation"] = dict(cfg.allocation)
    ctx.report["avg_bits"] = sum(params[n] * b for n, b in cfg.allocation.items()) / sum(
        params.values()
    )
    return dict(cfg.allocation)


def _report(
    ctx: Context,
    cfg: Mixed,
    sites: list[LinearSite],
    allocation: dict[str, int],
    sens: dict[str, dict[int, float]],
    cost: torch.Tensor,
    picks: torch.Tensor,
    seconds: float,
) -> None:
    params = torch.tensor([s.module.in_features * s.module.out_features for s in sites])
    widths = torch.tensor([allocation[s.name] for s in sites])
    avg = float((params * widths).sum() / params.sum())
    spent = int(cost.gather(1, picks[:, None]).sum())
    ctx.report["bit_allocation"] = allocation
    ctx.report["sensitivity"] = sens
    ctx.report["avg_bits"] = avg
    ctx.report["budget_used"] = spent / (8 * 2**20) if cfg.size_mb is not None else avg
    ctx.report["sensitivity_seconds"] = seconds
    counts = {b: int((widths == b).sum()) for b in cfg.bits}
    log.info(
        "mixed: %s layers per width, %.3f bits on average, sensitivities in %.1f s",
        counts,
        avg,
        seconds,
    )
