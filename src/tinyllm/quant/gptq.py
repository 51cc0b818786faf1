"""GPTQ (Frantar et al. 2022): quantize columns one at a time, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer's inputs."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping

import torch
from pydantic import Field, model_validator
from torch import nn

from tinyllm.core.calib import (
    Advanced,
    calibrate_blocks,
    observe_block,
    observe_pair,
    probe_block,
    staged_pass,
)
from tinyllm.core.hessian import (
    HessianAccumulator,
    inverse_cholesky,
    output_error,
    prepare_layer,
)
from tinyllm.core.kernels import one_thread
from tinyllm.core.steps import Context, register
from tinyllm.kernels.iq4grid import fit_codebook, iq4nl_codebook, nearest
from tinyllm.kernels.kgrid import derive, fit_kgrid, kspec, working_grid
from tinyllm.kernels.primitives import group_qparams, qmax
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.quant.common import (
    WeightQuant,
    block_error_status,
    fake_quant_then_swap,
    layer_cfg,
    sites_by_block,
)

log = logging.getLogger(__name__)


class GPTQ(WeightQuant):
    calibrated = True
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    # columns per lazy batch update (the paper's 128 measures the same with the transposed loop;
    # bench_gptq_parts.py; benchmarks/HISTORY.md)
    block_size: int = 32
    act_order: bool = True  # quantize columns by decreasing Hessian diagonal
    static_groups: bool = True  # group grids fixed from the original weights before any update
    mse: bool = True  # clipping search for each group's grid
    # Asymmetric calibration (GPTAQ, Li et al. 2025), with this strength (0 = off; the paper's
    # alpha is 0.25): each layer moves toward matching the *float model's* output X~ W^T on the
    # quantized model's inputs X, not the float weights' output X W^T, so errors from earlier
    # layers are compensated. Costs one more block pass per block.
    float_targets: float = Field(0.0, ge=0.0, le=1.0)
    # Clipping search of the group grids weighted by diag H (each input column's mean square),
    # squared error: the grid keeps the columns that carry signal, as an importance matrix does.
    # On SmolLM2 it took plain GPTQ 4-bit g64 from 1.17x to 1.12x FP32 perplexity (BENCHMARKS.md).
    weighted_grid: bool = True
    # Quantize a block's layers in the order its forward reads them (q/k/v, o, gate/up, down),
    # each stage's Hessian taken with the earlier stages already quantized (GPTQ's paper
    # quantizes a block's layers on inputs that passed through its quantized predecessors).
    # None (the default) = on for GPTQ on its own without float targets, where the stages run
    # as one staged pass (core.calib.staged_pass: about one block forward, against the two of
    # unstaged calibration); off with float targets and under AWQ, where stages cost extra
    # partial forwards (about a third more forward work).
    true_sequential: bool | None = None
    # Rounds of scale refitting after the column loop: each refits every row's group scales,
    # codes fixed, by least squares on the layer's output error (w - A s)^T H (w - A s) (GPTQ
    # fixes a group's scale before its columns are reached and never revisits it); a further
    # round reruns the column loop on the refitted grids, then refits again. 0 = off.
    refit_scales: int = Field(0, ge=0, le=8)

    @model_validator(mode="after")
    def _kquant_fits(self) -> GPTQ:
        fixed = self.kquant or self.codebook
        if fixed is not None and not self.static_groups:
            raise ValueError(f"{fixed} grids are fixed before the column loop: static_groups")
        if fixed is not None and self.refit_scales:
            raise ValueError(f"refit_scales would leave the {fixed} grid")
        return self


def staged(cfg: GPTQ) -> bool:
    """Whether GPTQ quantizes each block's layers in stages (cfg.true_sequential, resolved)."""
    if cfg.true_sequential is not None:
        return cfg.true_sequential
    return cfg.float_targets == 0


def _grid_search(cfg: GPTQ, diag: torch.Tensor, cols: slice = slice(None)) -> dict:
    """group_qparams' search options for these columns: weighted by diag H if asked."""
    if cfg.mse and cfg.weighted_grid:
        return {"mse": True, "norm": 2.0, "importance": diag[cols]}
    return {"mse": cfg.mse}


def _group_grid(
    window: torch.Tensor, cfg: GPTQ, diag: torch.Tensor, col: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of one group of columns [rows, g] starting at `col` -> ([rows], [rows])."""
    opts = _grid_search(cfg, diag, slice(col, col + window.shape[1]))
    s, z = group_qparams(window, cfg.bits, -1, cfg.sym, **opts)
    return s[:, 0].half().float(), z[:, 0]


def kept_positions(W: torch.Tensor) -> torch.Tensor | None:
    """[out, in] bool mask of the nonzero weights of a pruned layer (None for a dense one)."""
    from tinyllm.models.sparsity import SPARSE_MIN

    zeros = W == 0
    return ~zeros if float(zeros.float().mean()) >= SPARSE_MIN else None


def float_target(
    W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float, strength: float = 1.0
) -> torch.Tensor:
    """The weight whose output on the quantized model's inputs X best matches the float model's
    output X~ W^T, with H = X^T X and C = X~^T X (same scaling): argmin_V ||X V^T - X~ W^T||^2 +
    lam ||V - W||^2 = W + W (C - H)(H + lam I)^-1, lam = damp * mean(diag H). GPTQ on this
    target with H minimizes ||X Q^T - X~ W^T||^2 (the two differ by a constant). The full step
    overfits the calibration set badly on SmolLM2 (targets 70-80% away from W, perplexity in
    the thousands), so `strength` scales it, as GPTAQ's alpha does."""
    Hd = H.clone()
    Hd.diagonal().add_(damp * H.diagonal().mean())
    with one_thread():  # bits independent of the thread count
        L, info = torch.linalg.cholesky_ex(Hd)
        if info != 0:
            log.warning("float target skipped: the damped Hessian is not positive definite")
            return W
        step = torch.cholesky_solve((C - H).t() @ W.t(), L).t()
    return W + strength * step


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: GPTQ,
    name: str = "layer",
    C: torch.Tensor | None = None,
) -> tuple[QuantizedWeight, float]:
    """[out, in] weight and [in, in] Hessian -> (QuantizedWeight, relative output error).
    With C (the float model's inputs against the quantized model's, X~^T X) the layer aims at
    the float model's output (float_target); a pruned layer keeps its own weights as target."""
    return gptq_quantize_stack([W], H, cfg, name, C)[0]


def gptq_quantize_stack(
    Ws: list[torch.Tensor],
    H: torch.Tensor,
    cfg: GPTQ,
    name: str = "layers",
    C: torch.Tensor | None = None,
) -> list[tuple[QuantizedWeight, float]]:
    """GPTQ of several layers that read the same input (q/k/v, gate/up) in one pass: GPTQ treats
    rows independently given H, so stacking them gives each layer its own result while the
    column loop and the Cholesky run once. -> [(QuantizedWeight, relative output error)]"""
    W, H = prepare_layer(torch.cat([w.detach() for w in Ws]), H)
    if C is not None and cfg.float_targets > 0 and kept_positions(W) is None:
        W = float_target(W, H, C.float(), cfg.damp, cfg.float_targets)
    qw = _gptq(W, H, cfg, name)
    for k in range(cfg.refit_scales):
        if k > 0:  # codes again, on the refitted grids
            qw = _gptq(W, H, cfg, name, grid=(qw.scale, qw.zero))
        qw = refit_scales(qw, W, H)
    sizes = [w.shape[0] for w in Ws]
    parts = [qw] if len(Ws) == 1 else qw.split_rows(sizes)
    return [
        (q, output_error(t, q.dequantize(), H)) for q, t in zip(parts, W.split(sizes), strict=True)
    ]


def _gptq(
    W: torch.Tensor, H: torch.Tensor, cfg: GPTQ, name: str, grid: tuple | None = None
) -> QuantizedWeight:
    """The column loop on a prepared weight and Hessian (neither is modified). `grid` (scale,
    zero) [rows, groups], in the codes' stored group order, fixes every group's grid instead of
    searching it (refit rounds)."""
    rows, cols = W.shape
    g = cols if cfg.group_size == -1 else cfg.group_size
    perm = torch.argsort(H.diagonal(), descending=True) if cfg.act_order else torch.arange(cols)
    static = cfg.static_groups or cfg.group_size == -1
    search = grid is None and not static  # grids from the updated weights as groups are reached
    book = iq4nl_codebook() if cfg.codebook is not None else None
    scale, zero, superblock = _fixed_grid(W, H, cfg, grid, static)
    # per column, in processing order (dynamic groups are stored in processing order)
    group_of = perm // g if static else torch.arange(cols) // g
    # The loop works on transposed copies ([columns, rows]): each column is a contiguous row.
    col_scale, col_zero = scale.t()[group_of].contiguous(), zero.t()[group_of].contiguous()
    if book is not None:  # w / s on a block whose scale is 0 (all zeros): any index will do
        col_div = torch.where(col_scale == 0, torch.ones_like(col_scale), col_scale)
    hdiag = H.diagonal()[perm]  # (the loop needs no permuted copy of H: U is made from H)
    Wt = W.t()[perm].contiguous()
    keep = kept_positions(Wt)  # a pruned model stays pruned: zeros are quantized to exact zeros
    U = inverse_cholesky(H, cfg.damp, name, perm if cfg.act_order else None)
    diag = U.diagonal().tolist()
    codes = torch.empty(cols, rows, dtype=torch.uint8)  # processing order
    top = qmax(cfg.bits)
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        W1, Err1, Q1 = Wt[i1:i2].clone(), torch.zeros(i2 - i1, rows), torch.zeros(i2 - i1, rows)
        for i in range(i2 - i1):
            col = i1 + i
            if search and col % g == 0:  # grid from the current, updated weights
                window = torch.cat([W1[i:], Wt[i2:]])[:g].t()
                scale[:, col // g], zero[:, col // g] = _group_grid(window, cfg, hdiag, col)
                col_scale[col : col + g] = scale[:, col // g]
                col_zero[col : col + g] = zero[:, col // g]
            w, s, z, q, err = W1[i], col_scale[col], col_zero[col], Q1[i], Err1[i]
            if book is not None:  # the nearest table value, not an integer step
                q.copy_(nearest(w / col_div[col]))
            else:
                torch.div(w, s, out=q).add_(z).round_().clamp_(0, top)
            if keep is not None:  # z: the code of 0 (a K grid's float zero: the nearest code)
                torch.where(keep[col], q, z.round().clamp(0, top), out=q)
            _column_error(w, s, z, q, book, err).div_(-diag[col])
            W1[i + 1 :].addr_(U[col, col + 1 : i2], err, alpha=-1.0)
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)
        codes[i1:i2] = Q1  # (whole numbers 0..top: exact in uint8)
    if cfg.kquant is not None or book is not None:
        stored = torch.empty(rows, cols, dtype=torch.uint8)
        stored[:, perm] = codes.t()
        if book is not None:
            return QuantizedWeight.from_iq4nl(stored, scale)
        return QuantizedWeight.from_kquant(stored, cfg.kquant, superblock)
    return _record(codes.t(), scale, zero, perm, cfg, static)


def _column_error(
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    q: torch.Tensor,
    book: torch.Tensor | None,
    err: torch.Tensor,
) -> torch.Tensor:
    """err = dequantized code - w, in place: (q - z) s on a grid, V[q] s on a codebook."""
    if book is not None:
        return torch.mul(book[q.long()], s, out=err).sub_(w)
    return torch.sub(q, z, out=err).mul_(s).sub_(w)  # one pass per op, no temporaries


def _fixed_grid(
    W: torch.Tensor, H: torch.Tensor, cfg: GPTQ, grid: tuple | None, static: bool
) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """(scale, zero, K super-block parameters or None) the column loop starts from: a K-quant
    grid, IQ4_NL's block scales (searched by the diag-H-weighted error), or _start_grid's."""
    if cfg.kquant is not None:
        superblock = fit_kgrid(
            W, kspec(cfg.kquant), _grid_search(cfg, H.diagonal()).get("importance")
        )
        scale, zero = working_grid(*derive(superblock, kspec(cfg.kquant)), kspec(cfg.kquant))
        return scale, zero, superblock
    if cfg.codebook is not None:
        _, scale = fit_codebook(cfg.codebook, W, H.diagonal())
        return scale, torch.full_like(scale, 8.0), None  # 8: the index nearest 0 (pruned)
    return (*_start_grid(W, H, cfg, grid, static), None)


def _start_grid(
    W: torch.Tensor, H: torch.Tensor, cfg: GPTQ, grid: tuple | None, static: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grids the column loop starts from, [rows, groups] each: given (refit rounds), from
    the original weights (static groups) or zeros that the loop fills as it reaches each group."""
    rows, cols = W.shape
    g = cols if cfg.group_size == -1 else cfg.group_size
    if grid is not None:
        scale, zero = grid[0].float(), grid[1].float()
    elif static:  # grids from the original weights, in original column order
        scale, zero = group_qparams(
            W, cfg.bits, cfg.group_size, cfg.sym, **_grid_search(cfg, H.diagonal())
        )
    else:
        scale, zero = torch.zeros(rows, cols // g), torch.zeros(rows, cols // g)
    return scale.half().float(), zero


def _record(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    perm: torch.Tensor,
    cfg: GPTQ,
    static: bool,
) -> QuantizedWeight:
    """The record of codes [rows, cols] in processing order: static groups follow the original
    columns, so their codes are stored in original order; dynamic ones keep the permutation."""
    if static:
        out = torch.empty_like(codes)
        out[:, perm] = codes
        return QuantizedWeight.from_codes(
            out, scale, zero, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym
        )
    return QuantizedWeight.from_codes(
        codes,
        scale,
        zero,
        bits=cfg.bits,
        group_size=cfg.group_size,
        sym=cfg.sym,
        perm=perm if cfg.act_order else None,
    )


REFIT_CHUNK_FLOATS = 1 << 25  # bound on the einsum intermediate (128 MiB) of refit_scales


def refit_scales(
    qw: QuantizedWeight, W: torch.Tensor, H: torch.Tensor, ridge: float = 1e-4
) -> QuantizedWeight:
    """Least-squares group scales for fixed codes: per row r, with c = code - zero and A_r the
    [in, groups] matrix holding c in each group's own column, minimise (w_r - A_r s)^T H
    (w_r - A_r s) + lam ||s - s_old||^2, i.e. solve (A^T H A + lam I) s = A^T H w + lam s_old.
    The small ridge (lam = ridge * mean diagonal of A^T H A) keeps a group whose codes are all
    at the zero point at its old scale. Rows go in chunks, so memory stays bounded on wide
    layers. Scales stay fp16, as stored."""
    rows, cols = qw.shape
    g = qw.effective_group
    G = cols // g
    if qw.perm is not None:  # codes in stored order: bring target and Hessian into that order
        W, H = W[:, qw.perm], H[qw.perm][:, qw.perm]
    c = (qw.codes().float() - qw.zero.float().repeat_interleave(g, dim=1)).reshape(rows, G, g)
    H4 = H.reshape(G, g, G, g)
    b = ((W @ H).reshape(rows, G, g) * c).sum(-1)  # A^T H w [rows, G]
    old = qw.scale.float()
    s = torch.empty_like(old)
    step = max(1, REFIT_CHUNK_FLOATS // (G * G * g))
    for r0 in range(0, rows, step):
        r = slice(r0, r0 + step)
        M = torch.einsum("rai,aibj,rbj->rab", c[r], H4, c[r])  # A^T H A per row [rows, G, G]
        lam = ridge * M.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)  # [rows]
        M.diagonal(dim1=1, dim2=2).add_(lam[:, None])
        s[r] = torch.linalg.solve(M, b[r] + lam[:, None] * old[r])
    s = torch.where(torch.isfinite(s), s, old).half()
    return dataclasses.replace(qw, scale=s.contiguous())


def gptq_block(
    block: nn.Module,
    sites: list,
    xs: list,
    kwargs: dict,
    cfg: GPTQ,
    errors: dict[str, float],
    layer_bits: Mapping[str, int | str] | None = None,
    ref: list | None = None,
    float_block: nn.Module | None = None,
    advance: bool = False,
) -> dict[str, QuantizedWeight]:
    """Hessians of one block's linears from its calibration inputs, then GPTQ on each (at its
    own width where `layer_bits` names it), leaving each quantized weight in its float linear.
    With `ref` (the float model's hidden states, advanced through the block here) each layer
    aims at the float model's outputs, computed by `float_block` (default: the block as it is on
    entry). With staged(cfg) the layers go in stages (q/k/v, o, gate/up, down), each
    observed with the earlier stages quantized; with `advance` too (and no `ref`) that runs as
    core.calib.staged_pass, which also replaces `xs` by the block's quantized outputs."""
    names = [s.local for s in sites]
    in_stages = staged(cfg) and names  # (a block with nothing to quantize: one empty stage)
    probe = probe_block(block, xs[0], kwargs, names) if in_stages else None
    stages = probe.stages if probe is not None else [names]
    if ref is not None and float_block is None and len(stages) > 1:
        float_block = copy.deepcopy(block)  # the stages below quantize `block` in place
    by_local = {s.local: s for s in sites}
    records: dict[str, QuantizedWeight] = {}

    def quantize_stage(stage: list[str], acc: HessianAccumulator) -> None:
        stage_sites = [by_local[local] for local in stage]
        records.update(_quantize_stage(stage_sites, acc, cfg, layer_bits or {}, errors))

    if advance and staged(cfg) and ref is None:
        accs = [HessianAccumulator()]

        def compress(stage: list[str]) -> None:
            quantize_stage(stage, accs[0])
            accs[0] = HessianAccumulator()

        observe = lambda name, x: accs[0].add(name, x)  # noqa: E731 (the stage's accumulator)
        staged_pass(block, xs, kwargs, stages if names else [], observe, compress, probe=probe)
        return records
    for k, stage in enumerate(stages):
        acc = HessianAccumulator()
        if ref is None:
            observe_block(block, xs, kwargs, stage, acc.add)
        else:
            last = k == len(stages) - 1
            observe_pair(block, xs, ref, kwargs, stage, acc.add, float_block, advance=last)
        quantize_stage(stage, acc)
    return records


def _quantize_stage(
    sites: list,
    acc: HessianAccumulator,
    cfg: GPTQ,
    layer_bits: Mapping[str, int | str],
    errors: dict,
) -> dict[str, QuantizedWeight]:
    """GPTQ on one stage's layers from their Hessians; layers sharing an input and a width
    quantize together. Each quantized weight is left in its float linear."""
    records: dict[str, QuantizedWeight] = {}
    stacks: dict[tuple, list] = {}
    for s in sites:
        c = layer_cfg(cfg, s.name, layer_bits, s.module.in_features)
        key = (acc.alias.get(s.local, s.local), c.bits, c.group_size, c.sym, c.kquant, c.codebook)
        stacks.setdefault(key, []).append((s, c))
    for (owner, *_), members in stacks.items():
        results = gptq_quantize_stack(
            [s.module.weight for s, _ in members],
            acc.hessian(owner),
            members[0][1],
            "+".join(s.name for s, _ in members),
            acc.cross(owner),
        )
        for (s, _), (qw, err) in zip(members, results, strict=True):
            records[s.local], errors[s.name] = qw, err
            s.module.weight.data = qw.dequantize()
    return records


@register(GPTQ)
def apply(model: nn.Module, cfg: GPTQ, ctx: Context) -> None:
    by_block = sites_by_block(model, cfg.group_size)
    errors = ctx.report.setdefault("layer_errors", {})

    def quantize_block(i: int, block: nn.Module, xs: list, kwargs: dict, ref=None):
        advance = staged(cfg) and ref is None  # staged_pass computes the outputs
        records = gptq_block(
            block, by_block.pop(i, []), xs, kwargs, cfg, errors, ctx.layer_bits, ref, None, advance
        )
        finish = fake_quant_then_swap(block, records)
        return Advanced(finish) if advance else finish

    calibrate_blocks(
        model,
        ctx.calib,
        ctx.batch_size,
        quantize_block,
        "GPTQ",
        block_error_status(by_block, errors),
        reference=cfg.float_targets > 0,
    )
