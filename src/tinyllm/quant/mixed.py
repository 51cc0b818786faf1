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

Over GGUF types (`types`, e.g. q3_k, q4_k, q5_0, q6_k, q8_0) the options are whole grids rather
than widths: a layer gets the grid of one type (quant/common.py gguf_grid), so `tinyllm export
--type auto` writes it as that type, a per-tensor mix chosen by measurement where llama.cpp's
_S/_M/_L mixes choose by rule. Each option's cost is the type's exact GGUF bytes, its probe is
RTN on the type's grid (the K-quant search for K types), and a type whose blocks do not tile a
layer's rows (K types need inputs in whole super-blocks of 256) is not offered to that layer.
The budget is then `target_bpw`, GGUF bits per weight of the block linears with scales and mins
counted (llama.cpp's "bpw"), or `size_mb`, their GGUF MiB.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from functools import reduce
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from tinyllm.core.calib import Advanced, block_inputs, calibrate_blocks, run_block
from tinyllm.core.kernels import OneDNNLinear, fast_linears, onednn_available
from tinyllm.core.placement import placement
from tinyllm.core.steps import Context, Step, apply_step, register
from tinyllm.errors import ConfigError
from tinyllm.kernels.primitives import SUPPORTED_BITS
from tinyllm.models.anatomy import LinearSite, analyze
from tinyllm.quant.awq import AWQ
from tinyllm.quant.common import (
    GGUF_GRID_TYPES,
    WeightQuant,
    check_divisible,
    gguf_bpw,
    gguf_fits,
    gguf_grid,
    gguf_type_bits,
    target_linears,
)
from tinyllm.quant.gptq import GPTQ
from tinyllm.quant.rtn import RTN, rtn_quantize
from tinyllm.util import dist
from tinyllm.util.fs import write_text_atomic
from tinyllm.util.progress import make_progress

log = logging.getLogger(__name__)

TOKENS_PER_BATCH = 1024  # sensitivity windows per forward, up to this many tokens
MAX_STATES = 1 << 17  # budget resolution of the allocation table (coarser costs beyond)
# GGUF types offered when a budget in bits per weight is given without types: every K type,
# IQ4_NL and the symmetric legacy types (rows not in whole 256s get those; q4_1/q5_1 on request)
DEFAULT_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "iq4_nl", "q5_0", "q8_0")


class Mixed(Step):
    """Per-layer bit widths from measured sensitivity under a budget, then the base quantizer."""

    calibrated = True
    base: RTN | GPTQ | AWQ = Field(default_factory=lambda: RTN(bits=4, group_size=64))
    bits: list[int] = Field(default_factory=lambda: [3, 4, 8])  # candidate widths
    # candidate GGUF types instead of widths (a layer gets one type's whole grid)
    types: list[str] | None = None
    avg_bits: float | None = None  # budget: parameter-weighted mean code width
    size_mb: float | None = None  # budget: MiB of the block linears with scales and zeros
    target_bpw: float | None = None  # budget over types: GGUF bits per weight, scales included
    # kld: the next-token KL with one layer quantized (every later block re-run: in memory);
    # block: the squared error that layer adds to its own block's output (block-local: streams)
    sensitivity: Literal["kld", "block"] = "kld"
    sensitivity_samples: int = 2  # calibration windows the sensitivities are measured on
    sensitivity_seq_len: int = 128  # tokens of each of those windows (their first tokens)
    # a saved allocation (layer -> bits or GGUF type, e.g. from `tinyllm plan`) replayed
    # instead of measuring
    allocation: dict[str, int | str] | None = None
    # JSON file of measured sensitivities: reused when it holds every layer and option with the
    # same probe windows, else measured and written; one file per model and calibration corpus
    sensitivity_cache: str | None = None

    @field_validator("types")
    @classmethod
    def _types(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("types must offer at least one GGUF type, e.g. [q4_k, q5_0, q8_0]")
        bad = [t for t in v if t not in GGUF_GRID_TYPES]
        if bad:
            raise ValueError(f"types must be among {', '.join(GGUF_GRID_TYPES)}, got {bad}")
        return sorted(set(v), key=lambda t: (gguf_bpw(t), t))

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
        if self.types is not None:
            return self._types_budget()
        if self.target_bpw is not None:
            raise ValueError(
                "target_bpw is the budget over GGUF types: give types too (or avg_bits, the mean "
                "code width, for plain widths)"
            )
        if grid_of(self.base).kquant is not None or grid_of(self.base).codebook is not None:
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

    def _types_budget(self) -> Mixed:
        grid = grid_of(self.base)
        for t in self.types:  # every type's grid must be one the base can quantize onto
            try:
                type(grid).model_validate({**grid.model_dump(), **gguf_grid(t)})
            except ValueError as exc:
                msg = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
                raise ValueError(f"the base cannot quantize onto {t}: {msg}") from None
        if self.allocation is not None:
            bad = sorted({str(t) for t in self.allocation.values() if t not in self.types})
            if bad:
                raise ValueError(f"allocation uses types {bad} not offered in types {self.types}")
            if self.target_bpw is not None or self.size_mb is not None:
                raise ValueError("an allocation replaces the budget: drop target_bpw / size_mb")
            return self
        if self.avg_bits is not None:
            raise ValueError(
                "over GGUF types the budget is target_bpw (bits per weight, scales included, e.g. "
                "4.8) or size_mb, not avg_bits"
            )
        if (self.target_bpw is None) == (self.size_mb is None):
            raise ValueError(
                "give exactly one budget: target_bpw (GGUF bits per weight of the block linears, "
                "e.g. 4.8) or size_mb (their MiB)"
            )
        if self.size_mb is not None and self.size_mb <= 0:
            raise ValueError(f"size_mb must be positive, got {self.size_mb}")
        if self.target_bpw is not None and self.target_bpw <= 0:
            raise ValueError(f"target_bpw must be positive, got {self.target_bpw}")
        return self

    def whole_model(self) -> str | None:
        if self.allocation is not None or self.sensitivity_cache is not None:
            return None  # the base quantizer alone goes over the blocks: it streams
        if self.sensitivity == "block":
            return None  # a measuring pass over the blocks, then the base's: it streams
        return (
            "measuring KL sensitivities re-runs every later block for each layer; stream it "
            "with --sensitivity block (block-local), an allocation (`tinyllm plan`) or a "
            "--sensitivity-cache measured in memory before"
        )

    @property
    def options(self) -> list[int] | list[str]:
        """What a layer chooses among: widths, or GGUF types (cheapest first)."""
        return self.types if self.types is not None else self.bits


def grid_of(base: RTN | GPTQ | AWQ) -> RTN | GPTQ:
    """The quantizer whose width varies per layer (AWQ's own base)."""
    return base.base if isinstance(base, AWQ) else base


# --- costs and budget -------------------------------------------------------------------------


def storage_bits(out_f: int, in_f: int, bits: int, group_size: int, sym: bool) -> int:
    """QuantizedWeight.storage_bits of an affine grid: codes, float16 scales, zeros if asym."""
    groups = out_f * (1 if group_size == -1 else in_f // group_size)
    return out_f * in_f * bits + groups * 16 + (0 if sym else groups * bits)


def cost_table(sites: list[LinearSite], cfg: Mixed, grid: WeightQuant) -> torch.Tensor:
    """Budget cost of every layer at every option, in bits. -> int64 [layers, options]. Over
    types a type that does not tile a layer costs as much as its costliest one that does (its
    loss is infinite: it is never chosen)."""
    rows = []
    for s in sites:
        out_f, in_f = s.module.out_features, s.module.in_features
        if cfg.types is not None:
            rows.append(gguf_type_bits(out_f, in_f, cfg.types))
        elif cfg.size_mb is not None:
            rows.append([storage_bits(out_f, in_f, b, grid.group_size, grid.sym) for b in cfg.bits])
        else:
            rows.append([out_f * in_f * b for b in cfg.bits])
    return torch.tensor(rows, dtype=torch.int64)


def budget_bits(cfg: Mixed, sites: list[LinearSite], cost: torch.Tensor) -> int:
    """The budget in the units of cost_table; ConfigError when even the narrowest width is over."""
    params = sum(s.module.in_features * s.module.out_features for s in sites)
    if cfg.avg_bits is not None:
        return math.floor(cfg.avg_bits * params + 1e-6)
    least = int(cost.min(dim=1).values.sum())
    if cfg.target_bpw is not None:
        budget = math.floor(cfg.target_bpw * params + 1e-6)
        if budget < least:
            bpw = least / params
            raise ConfigError(
                f"target_bpw {cfg.target_bpw} is below the smallest reachable: {bpw:.4g} bits "
                f"per weight with every block linear in its cheapest type of {cfg.types}; raise "
                f"target_bpw to at least {bpw:.4g} or offer a cheaper type"
            )
        return budget
    budget = math.floor(cfg.size_mb * 8 * 2**20 + 1e-6)
    if budget < least:
        mib = least / (8 * 2**20)
        cheapest = f"its cheapest type of {cfg.types}" if cfg.types else f"{cfg.bits[0]} bits"
        raise ConfigError(
            f"size_mb {cfg.size_mb} is below the smallest size reachable: {mib:.4g} MiB with "
            f"every block linear at {cheapest} (scales and zero points included); raise "
            f"size_mb to at least {mib:.4g} or offer a cheaper option"
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


def probe_config(grid: RTN | GPTQ, option: int | str, exact: bool) -> RTN:
    """The RTN grid one layer is quantized on to measure its sensitivity at `option`: a width
    on the base's grid, or a GGUF type's whole grid."""
    if isinstance(option, str):
        return RTN(**gguf_grid(option), mse=exact and grid.mse)
    return RTN(bits=option, group_size=grid.group_size, sym=grid.sym, mse=exact and grid.mse)


def _check_types(sites: list[LinearSite], types: list[str]) -> None:
    """Every layer must be tiled by at least one offered type."""
    for s in sites:
        if not any(gguf_fits(t, s.module.in_features) for t in types):
            raise ConfigError(
                f"none of the types {types} tiles the {s.module.in_features} input features of "
                f"{s.name} (K types need multiples of 256, the others of 32): offer a type that "
                "does, e.g. q5_0 or q8_0"
            )


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
    bits: list[int] | list[str],
    quantizer: Callable[[torch.Tensor, int | str], torch.Tensor | None],
) -> dict[str, dict[int | str, float]]:
    """KL(float || model) with only one layer quantized by quantizer(weight, option) ->
    dequantized weight, for every layer and option (a width or a GGUF type): {layer name:
    {option: mean KL per position}}. An option the quantizer answers None for (a type that does
    not tile the layer) is infinitely bad."""
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
                    q = quantizer(w, b)
                    if q is None:
                        out[s.name][b] = math.inf
                        bar.update(task, advance=1, info=f"{s.name} {b}")
                        continue
                    s.module.weight.data = q.to(w.dtype)
                    try:
                        out[s.name][b] = max(probe.kl(s.block), 0.0)
                    finally:
                        s.module.weight.data = w
                    bar.update(task, advance=1, info=f"{s.name} {b}")
    finally:
        for stack in stacks:
            stack.close()
        model.train(was_training)
    return out


@torch.no_grad()
def block_sensitivity(
    model: nn.Module,
    windows: torch.Tensor,
    options: list[int] | list[str],
    quantizer: Callable[[torch.Tensor, int | str], torch.Tensor | None],
    ctx: Context,
) -> dict[str, dict[int | str, float]]:
    """Block-local sensitivities, one pass over the blocks (so a streamed model measures them):
    for every layer and option, that layer alone quantized, the mean squared change of its
    block's output on the float inputs. The residual stream carries a block's output change to
    the final norm, which scales every block's alike, so these add up across blocks as KL does
    to first order; what a change does after its block is not measured (that is the KL
    sensitivity's cost: every later block per probe). -> {layer: {option: error}}"""
    out: dict[str, dict[int | str, float]] = {}

    def measure(i: int, block: nn.Module, xs: list, kwargs: dict) -> Advanced:
        ref = [run_block(block, x, kwargs) for x in xs]
        tokens = sum(x.shape[0] * x.shape[1] for x in xs)
        for s in (s for s in target_linears(model) if s.block == i):
            w, out[s.name] = s.module.weight.data, {}
            for option in options:
                q = quantizer(w, option)
                if q is None:
                    out[s.name][option] = math.inf
                    continue
                s.module.weight.data = q.to(w.dtype)
                try:
                    err = sum(float((run_block(block, x, kwargs) - r).float().pow(2).sum())
                              for x, r in zip(xs, ref, strict=True))  # fmt: skip
                finally:
                    s.module.weight.data = w
                out[s.name][option] = err / tokens
        xs[:] = ref  # the float outputs are the next block's inputs
        return Advanced()

    calibrate_blocks(model, windows, ctx.batch_size, measure, "block sensitivity")
    return out


# --- the step ---------------------------------------------------------------------------------


def _loss_table(sens: dict[str, dict], sites: list[LinearSite], cfg: Mixed) -> torch.Tensor:
    """[layers, options] sensitivities. Widths: made non-increasing in width (a wider grid
    measuring worse than a narrower one is noise of the probe windows). Types are different
    grids, not nested ones: a costlier type may truly be worse, and stays as measured."""
    opts = cfg.options
    table = torch.tensor([[sens[s.name][b] for b in opts] for s in sites], dtype=torch.float64)
    return table if cfg.types is not None else table.cummin(dim=1).values


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
    if cfg.types is None:
        check_divisible(sites, grid.group_size)
    else:
        _check_types(sites, cfg.types)
    if cfg.allocation is not None:
        allocation = _replay(ctx, cfg, sites)
    else:
        cost = cost_table(sites, cfg, grid)
        budget = budget_bits(cfg, sites, cost)
        t0 = time.perf_counter()
        exact = isinstance(cfg.base, RTN)

        def quantizer(w: torch.Tensor, option: int | str) -> torch.Tensor | None:
            if isinstance(option, str) and not gguf_fits(option, w.shape[1]):
                return None
            return rtn_quantize(w.float(), probe_config(grid, option, exact)).dequantize()

        sens = _cached(cfg, sites)
        if sens is None and cfg.sensitivity == "block":
            sens = block_sensitivity(model, _windows(ctx, cfg), cfg.options, quantizer, ctx)
            _store(cfg, sens)
        if sens is None and placement().streaming:
            raise ConfigError(
                f"mixed: {cfg.sensitivity_cache} does not hold this model's sensitivities for "
                f"{cfg.options} on {_cache_key(cfg)} probe windows, and a streamed model cannot "
                "measure them (every later block per layer); run once with --stream off to "
                "fill the cache"
            )
        if sens is None:
            sens = measure_sensitivity(model, sites, _windows(ctx, cfg), cfg.options, quantizer)
            _store(cfg, sens)
        seconds = time.perf_counter() - t0
        picks = allocate(_loss_table(sens, sites, cfg), cost, budget)
        allocation = {s.name: cfg.options[int(k)] for s, k in zip(sites, picks, strict=True)}
        _report(ctx, cfg, sites, allocation, sens, cost, picks, seconds)
    del sites  # a site holds its linear: the base must be able to free each one it swaps out
    previous = ctx.layer_bits
    ctx.layer_bits = {**previous, **allocation}
    try:
        apply_step(model, cfg.base, ctx)
    finally:
        ctx.layer_bits = previous


def _cache_key(cfg: Mixed) -> dict:
    key = {"samples": cfg.sensitivity_samples, "seq_len": cfg.sensitivity_seq_len}
    return key if cfg.sensitivity == "kld" else {**key, "sensitivity": cfg.sensitivity}


def _cached(cfg: Mixed, sites: list[LinearSite]) -> dict[str, dict] | None:
    """The sensitivities in cfg.sensitivity_cache when it covers every layer and option with the
    same probe windows, else None (measure)."""
    if cfg.sensitivity_cache is None or not Path(cfg.sensitivity_cache).is_file():
        return None
    try:
        data = json.loads(Path(cfg.sensitivity_cache).read_text())
        table = data["sensitivity"]
        same = data.get("probe") == _cache_key(cfg)
        sens = {s.name: {o: float(table[s.name][str(o)]) for o in cfg.options} for s in sites}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning(
            "mixed: %s does not cover this model and options; measuring", cfg.sensitivity_cache
        )
        return None
    if not same:
        log.warning(
            "mixed: %s was measured on other probe windows; measuring", cfg.sensitivity_cache
        )
        return None
    log.info("mixed: sensitivities from %s", cfg.sensitivity_cache)
    return sens


def _store(cfg: Mixed, sens: dict[str, dict]) -> None:
    """Write the measured sensitivities (merged over an existing file's other options)."""
    if cfg.sensitivity_cache is None:
        return
    path = Path(cfg.sensitivity_cache)
    table: dict[str, dict] = {}
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
        if old.get("probe") == _cache_key(cfg):
            table = old.get("sensitivity", {})
    except (OSError, ValueError, AttributeError):
        table = {}
    for name, row in sens.items():
        table.setdefault(name, {}).update({str(k): v for k, v in row.items()})
    text = json.dumps({"probe": _cache_key(cfg), "sensitivity": table})
    write_text_atomic(path, text.replace("Infinity", '"inf"'))


def _replay(ctx: Context, cfg: Mixed, sites: list[LinearSite]) -> dict[str, int | str]:
    """A given allocation, checked: it must name exactly the model's block linears (and, over
    types, give each one a type that tiles it)."""
    names = {s.name for s in sites}
    missing, unknown = names - set(cfg.allocation), set(cfg.allocation) - names
    if missing or unknown:
        raise ConfigError(
            f"mixed: the allocation does not match this model's block linears (missing "
            f"{sorted(missing)[:3]}, unknown {sorted(unknown)[:3]}); plan it for this model"
        )
    for s in sites:
        t = cfg.allocation[s.name]
        if isinstance(t, str) and not gguf_fits(t, s.module.in_features):
            raise ConfigError(
                f"mixed: the allocation gives {s.name} type {t}, whose blocks do not tile its "
                f"{s.module.in_features} input features"
            )
    params = {s.name: s.module.in_features * s.module.out_features for s in sites}
    ctx.report["bit_allocation"] = dict(cfg.allocation)
    ctx.report[_mean_key(cfg)] = sum(
        params[n] * _width(b) for n, b in cfg.allocation.items()
    ) / sum(params.values())
    return dict(cfg.allocation)


def _width(option: int | str) -> float:
    """Bits per weight of an option: a code width, or a GGUF type's bpw (scales included)."""
    return gguf_bpw(option) if isinstance(option, str) else option


def _mean_key(cfg: Mixed) -> str:
    return "bpw" if cfg.types is not None else "avg_bits"


def _report(
    ctx: Context,
    cfg: Mixed,
    sites: list[LinearSite],
    allocation: dict[str, int | str],
    sens: dict[str, dict],
    cost: torch.Tensor,
    picks: torch.Tensor,
    seconds: float,
) -> None:
    params = torch.tensor([s.module.in_features * s.module.out_features for s in sites])
    widths = torch.tensor([_width(allocation[s.name]) for s in sites], dtype=torch.float64)
    avg = float((params * widths).sum() / params.sum())
    spent = int(cost.gather(1, picks[:, None]).sum())
    ctx.report["bit_allocation"] = allocation
    # JSON has no infinity: a type not offered to a layer is left out of its row
    ctx.report["sensitivity"] = {
        n: {k: v for k, v in row.items() if math.isfinite(v)} for n, row in sens.items()
    }
    ctx.report[_mean_key(cfg)] = avg
    ctx.report["budget_used"] = spent / (8 * 2**20) if cfg.size_mb is not None else avg
    ctx.report["sensitivity_seconds"] = seconds
    counts = {b: sum(1 for s in sites if allocation[s.name] == b) for b in cfg.options}
    log.info(
        "mixed: %s layers per option, %.3f bits per weight on average, sensitivities in %.1f s",
        counts,
        avg,
        seconds,
    )
