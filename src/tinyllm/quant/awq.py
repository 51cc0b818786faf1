"""AWQ (Lin et al. 2023): protect salient input channels by scaling them up before quantizing.

For each scaling group (an op whose output feeds some linears: a norm -> q/k/v, up -> down, ...)
the per-channel scale s = mean|x|^alpha (normalised) is searched over alpha in [0, 1) to minimise
the group's output error after quantization; the linears' weights are multiplied by s and the
preceding op divided by s, so the float model computes the same function. Optionally (`clip`)
each group's weight range is then shrunk to the factor that minimises that group's share of the
layer's output error on calibration inputs, and the weights are clamped to it. Then any base
quantizer (`AWQ(base=RTN(...))` or `AWQ(base=GPTQ(...))`) quantizes the scaled weights, on the
clamped range, without a second clipping search of its own (`base_search` restores it).

With per-layer widths (Context.layer_bits, set by the mixed-precision step) each layer's clipping
search and quantization use its own width; a scaling group's scale search uses the narrowest width
among the group's consumers, the layer whose rounding error the scale matters most for.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from tinyllm.core.calib import (
    Advanced,
    calibrate_blocks,
    input_hooks,
    observe_block,
    observe_pair,
    probe_input,
)
from tinyllm.core.hessian import HessianAccumulator
from tinyllm.core.steps import Context, Step, register
from tinyllm.kernels.primitives import _affine_params, fake_quant, group_qparams, grouped
from tinyllm.models.families import family_of
from tinyllm.quant.common import (
    block_error_status,
    fake_quant_then_swap,
    layer_cfg,
    relative_weight_error,
    sites_by_block,
)
from tinyllm.quant.gptq import GPTQ, gptq_block, gptq_quantize
from tinyllm.quant.rtn import RTN, rtn_quantize
from tinyllm.util import dist

log = logging.getLogger(__name__)

LOSS_TOKENS = 8192  # tokens per input behind the searches' second moments (RTN base)
CLIP_GRID = torch.linspace(1.0, 0.5, 20)  # candidate range shrinks for the clipping search


class AWQ(Step):
    calibrated = True
    base: RTN | GPTQ = Field(default_factory=lambda: RTN(bits=4, group_size=64))
    grid: int = 20  # alpha candidates in [0, 1)
    clip: bool = True  # activation-aware clipping search after scaling
    # After that clipping, also let the base run its own (weight-space) clipping search (its
    # `mse`). Off: the clamped weights' min/max is the grid (see clamped_base).
    base_search: bool = False


def quant_error(D: torch.Tensor, H: torch.Tensor) -> float:
    """Output error of a weight change D [out, in] on inputs with second moment H [in, in]:
    mean ||x D^T||^2 = sum((D H) * D), without touching the inputs again."""
    return float(((D @ H) * D).sum())


def search_scale(
    x_mag: torch.Tensor, H: torch.Tensor, weights: list[torch.Tensor], base: RTN | GPTQ, grid: int
) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale for linears sharing one input, from its mean magnitude
    x_mag [in] and second moment H [in, in]. -> (s [in], alpha)"""
    W = torch.cat(weights, dim=0).float()  # [sum(out), in]
    x_mag = x_mag.clamp_min(1e-8)
    best, best_s, best_alpha = float("inf"), torch.ones_like(x_mag), 0.0
    for k in range(grid):
        alpha = k / grid
        s = x_mag.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        Ws = W * s
        sc, z = group_qparams(Ws, base.bits, base.group_size, base.sym, mse=False)
        Wq = fake_quant(grouped(Ws, base.group_size), sc[..., None], z[..., None], base.bits)
        err = quant_error(Wq.reshape(W.shape) / s - W, H)
        if err < best:
            best, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha


def search_clip(H: torch.Tensor, w: torch.Tensor, base: RTN | GPTQ) -> torch.Tensor:
    """Clamp each (row, group) of w [out, in] to the shrink of its range that minimises the
    group's own share of the output error, d^T H_gg d with H_gg the group's diagonal block of the
    inputs' second moment H [in, in]. -> clamped w"""
    gs = w.shape[1] if base.group_size == -1 else base.group_size
    n = w.shape[1] // gs
    Hg = torch.stack([H[i * gs : (i + 1) * gs, i * gs : (i + 1) * gs] for i in range(n)])
    g = grouped(w.float(), base.group_size)  # [rows, groups, gs]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    best = torch.full_like(lo, float("inf"))
    best_r = torch.ones_like(lo)
    for r in CLIP_GRID.tolist():
        sc, z = _affine_params(lo * r, hi * r, base.bits, base.sym)
        d = g - fake_quant(g, sc[..., None], z[..., None], base.bits)  # [rows, groups, gs]
        err = torch.einsum("rgk,gkl,rgl->rg", d, Hg, d)  # [rows, groups]
        better = err < best
        best = torch.where(better, err, best)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    lo_c, hi_c = (lo * best_r)[..., None], (hi * best_r)[..., None]
    return torch.maximum(torch.minimum(g, hi_c), lo_c).reshape(w.shape)


def fold_scale(prev: nn.Module, linears: list[nn.Module], s: torch.Tensor, offset: float) -> None:
    """Divide the producing op's output by s and multiply the consumers' inputs by s."""
    if isinstance(prev, nn.Linear):  # rows of the producing linear
        prev.weight.data.div_(s[:, None])
        if prev.bias is not None:
            prev.bias.data.div_(s)
    else:  # a norm: y = (offset + w) * normed
        prev.weight.data.copy_((offset + prev.weight.data) / s - offset)
    for lin in linears:
        lin.weight.data.mul_(s[None, :])


def _feeds(
    block: nn.Module, prev: str, consumers: list[str], x0: torch.Tensor, kwargs: dict
) -> bool:
    """Whether `prev`'s output is exactly the tensor its consumers receive (checked on a batch)."""
    seen: dict[str, torch.Tensor] = {}
    outs: list[torch.Tensor] = []  # held, so no other tensor can take their memory meanwhile
    h = block.get_submodule(prev).register_forward_hook(lambda m, a, o: outs.append(o))
    try:
        with input_hooks(block, consumers, lambda n, x: seen.setdefault(n, x)):
            block(x0, **kwargs)
    finally:
        h.remove()
    ptrs = {o.data_ptr() for o in outs}
    return bool(outs) and all(c in seen and seen[c].data_ptr() in ptrs for c in consumers)


def _groups_for(model: nn.Module, block: nn.Module) -> list[tuple[str, list[str]]]:
    names = dict(block.named_modules())
    groups = []
    for prev, consumers in family_of(model).scaling_groups():  # models/families.py
        if prev not in names or not all(c in names for c in consumers):
            continue
        if (
            isinstance(names[prev], nn.Linear)
            and names[prev].out_features != names[consumers[0]].in_features
        ):
            continue  # e.g. v -> o under grouped-query attention: shapes do not line up
        groups.append((prev, consumers))
    return groups


@register(AWQ)
def apply(model: nn.Module, cfg: AWQ, ctx: Context) -> None:
    _check_data_parallel(cfg, ctx)
    by_block = sites_by_block(model, cfg.base.group_size)
    offset = family_of(model).norm_offset
    errors = ctx.report.setdefault("layer_errors", {})
    alphas = ctx.report.setdefault("awq_alpha", {})

    def quantize_block(i: int, block: nn.Module, xs: list, kwargs: dict, ref=None):
        block_sites = {s.local: s for s in by_block.pop(i, [])}
        groups = checked_groups(model, block, xs[0], kwargs, i)
        # GPTQ base in stages: its own passes take the Hessians after folding (and carry ref)
        # (true_sequential None, the default, leaves an AWQ base unstaged)
        staged = isinstance(cfg.base, GPTQ) and cfg.base.true_sequential is True
        stats = _observe(block, xs, kwargs, list(block_sites), cfg, None if staged else ref)
        bases = {
            loc: clamped_base(
                layer_cfg(cfg.base, s.name, ctx.layer_bits, s.module.in_features), cfg
            )
            for loc, s in block_sites.items()
        }
        scales = {}
        for prev, consumers in groups:
            group_bases = [bases.get(c, cfg.base) for c in consumers]
            s, alphas[f"{i}.{prev}"] = _scale_group(block, prev, consumers, stats, group_bases, cfg)
            fold_scale(
                block.get_submodule(prev), [block.get_submodule(c) for c in consumers], s, offset
            )
            scales.update({c: s for c in consumers})
        if staged:
            return _quantize_staged(
                block, block_sites, xs, kwargs, cfg, ctx, stats, scales, bases, ref
            )
        return _quantize_layers(block, block_sites, cfg, stats, scales, bases, errors)

    calibrate_blocks(
        model,
        ctx.calib,
        ctx.batch_size,
        quantize_block,
        "AWQ",
        block_error_status(by_block, errors),
        reference=isinstance(cfg.base, GPTQ) and cfg.base.float_targets > 0,
    )


@dataclass
class _Stats:
    """One pass's statistics of a block's linear inputs: Hessians (subsampled tokens for an RTN
    base) and per-channel absolute sums over `total` tokens."""

    acc: HessianAccumulator
    absum: dict[str, torch.Tensor]
    total: int


def _observe(
    block: nn.Module, xs: list, kwargs: dict, names: list[str], cfg: AWQ, ref: list | None
) -> _Stats:
    """One pass before any folding: folding keeps the float function, so every input's
    statistics can be read from the unscaled block and rescaled (x / s) afterwards. GPTQ needs
    full Hessians anyway; for RTN a subsample of tokens is enough. With `ref` (GPTQ base with
    float targets) the float model's inputs ride along."""
    total = sum(x.shape[0] * x.shape[1] for x in xs)
    step = 1 if isinstance(cfg.base, GPTQ) else max(1, total // LOSS_TOKENS)
    stats = _Stats(HessianAccumulator(), {}, total)

    def look(name: str, x: torch.Tensor, x_ref: torch.Tensor | None = None) -> None:
        stats.absum[name] = stats.absum.get(name, 0) + x.float().abs().sum(dim=0)
        stats.acc.add(name, x[::step], None if x_ref is None else x_ref[::step])

    if ref is None:
        observe_block(block, xs, kwargs, names, look)
    else:
        observe_pair(block, xs, ref, kwargs, names, look)
    if dist.world() > 1:  # every rank's tokens (the Hessians reduce on first read)
        for name in sorted(stats.absum):
            dist.all_reduce_sum(stats.absum[name])
        stats.total = int(dist.sum_over_ranks(float(total)))
    return stats


def _check_data_parallel(cfg: AWQ, ctx: Context) -> None:
    """Under several processes an RTN base's token subsample (every step-th token of each
    batch) would differ from the single-process one: refused unless there is no subsample."""
    if dist.world() == 1 or isinstance(cfg.base, GPTQ):
        return
    tokens = int(dist.sum_over_ranks(float(ctx.calib.numel())))
    if tokens // LOSS_TOKENS > 1:
        dist.refuse(
            "AWQ with an RTN base",
            f"its searches subsample the {tokens} calibration tokens per batch",
            f"give it a GPTQ base (full Hessians) or fewer than {2 * LOSS_TOKENS} calibration "
            "tokens",
        )


def _scale_group(
    block: nn.Module,
    prev: str,
    consumers: list[str],
    stats: _Stats,
    bases: list[RTN | GPTQ],
    cfg: AWQ,
) -> tuple[torch.Tensor, float]:
    """The searched input scale of one group's consumers -> (s [in], alpha)."""
    mods = [block.get_submodule(c) for c in consumers]
    x_mag, H = stats.absum[consumers[0]] / stats.total, stats.acc.hessian(consumers[0])
    group_base = min(bases, key=lambda b: b.bits)  # mixed precision: the narrowest grid
    return search_scale(x_mag, H, [m.weight for m in mods], group_base, cfg.grid)


def _quantize_staged(
    block: nn.Module,
    block_sites: dict,
    xs: list,
    kwargs: dict,
    cfg: AWQ,
    ctx: Context,
    stats: _Stats,
    scales: dict[str, torch.Tensor],
    bases: dict,
    ref: list | None,
):
    """Clip the folded block, then GPTQ it in stages (its own passes take the Hessians)."""
    float_block = copy.deepcopy(block) if ref is not None else None  # computes the float stream
    for local, site in block_sites.items() if cfg.clip else ():
        H = scaled_hessian(stats.acc.hessian(local), scales.get(local))
        site.module.weight.data = search_clip(H, site.module.weight.data, bases[local])
    sites = list(block_sites.values())
    base = clamped_base(cfg.base, cfg)
    advance = ref is None  # one staged pass, which also computes the block's outputs
    errors = ctx.report["layer_errors"]
    records = gptq_block(
        block, sites, xs, kwargs, base, errors, ctx.layer_bits, ref, float_block, advance
    )
    finish = fake_quant_then_swap(block, records)
    return Advanced(finish) if advance else finish


def _quantize_layers(
    block: nn.Module,
    block_sites: dict,
    cfg: AWQ,
    stats: _Stats,
    scales: dict[str, torch.Tensor],
    bases: dict,
    errors: dict[str, float],
):
    """Clip and quantize each folded linear on its own, from the rescaled statistics."""
    records = {}
    for local, site in block_sites.items():
        H = scaled_hessian(stats.acc.hessian(local), scales.get(local))
        C = scaled_hessian(stats.acc.cross(local), scales.get(local))
        base = bases[local]
        if cfg.clip:
            site.module.weight.data = search_clip(H, site.module.weight.data, base)
        w = site.module.weight.detach().float()
        if isinstance(base, GPTQ):
            records[local], errors[site.name] = gptq_quantize(w, H, base, site.name, C)
        else:
            records[local] = rtn_quantize(w, base)
            errors[site.name] = relative_weight_error(w, records[local])
    return fake_quant_then_swap(block, records)


def clamped_base(base: RTN | GPTQ, cfg: AWQ) -> RTN | GPTQ:
    """The base quantizer as AWQ runs it. After AWQ's clipping search (which picked each group's
    range by its share of the output error and clamped the weights to it) the grid is the
    clamped weights' min/max, as in the AWQ paper: the base's own weight-space MSE search would
    shrink the chosen ranges again by an objective that ignores the activations (for GPTQ, with
    static groups, the grids come from the clamped weights before any update). On smollm2-135m
    that second search took AWQ+RTN 4-bit per channel from 31.2 to 50.1 perplexity, and
    AWQ+GPTQ 4-bit g32 sym's KLD from 0.105 to 0.120 (BENCHMARKS.md)."""
    if cfg.clip and base.mse and not cfg.base_search:
        return base.model_copy(update={"mse": False})
    return base


def scaled_hessian(H: torch.Tensor | None, s: torch.Tensor | None) -> torch.Tensor | None:
    """A second-moment matrix of inputs divided by s (folded scales): H / (s s^T)."""
    return H if H is None or s is None else H / torch.outer(s, s)


def checked_groups(
    model: nn.Module, block: nn.Module, x0: torch.Tensor, kwargs: dict, i: int
) -> list[tuple[str, list[str]]]:
    """The family's scaling groups; a norm group is kept only if the graph confirms it."""
    kept = []
    for prev, consumers in _groups_for(model, block):
        direct = not isinstance(block.get_submodule(prev), nn.Linear)
        if direct and not _feeds(block, prev, consumers, probe_input(x0, kwargs), kwargs):
            log.warning("block %d: %s does not feed %s directly; not scaled", i, prev, consumers)
            continue
        kept.append((prev, consumers))
    return kept
