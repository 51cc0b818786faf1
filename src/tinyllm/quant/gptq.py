"""GPTQ (Frantar et al. 2022): quantize columns one at a time, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer's inputs."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping

import torch
from pydantic import Field
from torch import nn

from tinyllm.core.calib import (
    Advanced,
    calibrate_blocks,
    observe_block,
    observe_pair,
    probe_block,
    staged_pass,
)
from tinyllm.core.kernels import calib_dtype, one_thread, onednn_available
from tinyllm.core.steps import Context, register
from tinyllm.errors import ConfigError
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
    # bench_gptq_parts.py, BENCHMARKS.md session 16)
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


def staged(cfg: GPTQ) -> bool:
    """Whether GPTQ quantizes each block's layers in stages (cfg.true_sequential, resolved)."""
    if cfg.true_sequential is not None:
        return cfg.true_sequential
    return cfg.float_targets == 0


def inverse_cholesky(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag) I)^-1, retrying with more damping. On one
    thread, so its bits do not depend on the thread count (core.kernels.one_thread)."""
    with one_thread():
        return _inverse_cholesky(H, damp, name)


def _inverse_cholesky(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    mean_diag = H.diagonal().mean()
    for _ in range(6):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U
        log.warning("%s: Cholesky failed with damp %.3g, retrying with %.3g", name, damp, damp * 10)
        damp *= 10
    raise ConfigError(f"{name}: Hessian is not positive definite even with damp {damp:.3g}")


def _grid_search(cfg: GPTQ, H: torch.Tensor, cols: slice = slice(None)) -> dict:
    """group_qparams' search options for these columns: weighted by diag H if asked."""
    if cfg.mse and cfg.weighted_grid:
        return {"mse": True, "norm": 2.0, "importance": H.diagonal()[cols]}
    return {"mse": cfg.mse}


def _group_grid(
    window: torch.Tensor, cfg: GPTQ, H: torch.Tensor, col: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of one group of columns [rows, g] starting at `col` -> ([rows], [rows])."""
    opts = _grid_search(cfg, H, slice(col, col + window.shape[1]))
    s, z = group_qparams(window, cfg.bits, -1, cfg.sym, **opts)
    return s[:, 0].half().float(), z[:, 0]


def prepare_layer(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float copies of a weight and its Hessian; inputs never seen in calibration (zero diagonal)
    get a unit diagonal and zero weights, so the inverse exists."""
    W, H = W.detach().float().clone(), H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def kept_positions(W: torch.Tensor) -> torch.Tensor | None:
    """[out, in] bool mask of the nonzero weights of a pruned layer (None for a dense one)."""
    from tinyllm.prune.common import SPARSE_MIN

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
    if grid is not None:
        scale, zero = grid[0].float(), grid[1].float()
    elif static:  # grids from the original weights, in original column order
        scale, zero = group_qparams(W, cfg.bits, cfg.group_size, cfg.sym, **_grid_search(cfg, H))
    else:
        scale, zero = torch.zeros(rows, cols // g), torch.zeros(rows, cols // g)
    scale = scale.half().float()
    # per column, in processing order (dynamic groups are stored in processing order)
    group_of = perm // g if static else torch.arange(cols) // g
    # The loop works on transposed copies ([columns, rows]): each column is a contiguous row.
    col_scale, col_zero = scale.t()[group_of].contiguous(), zero.t()[group_of].contiguous()
    H = H[perm][:, perm]
    Wt = W.t()[perm].contiguous()
    keep = kept_positions(Wt)  # a pruned model stays pruned: zeros are quantized to exact zeros
    U = inverse_cholesky(H, cfg.damp, name)
    diag = U.diagonal().tolist()
    codes = torch.zeros(cols, rows)  # processing order
    top = qmax(cfg.bits)
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        W1, Err1 = Wt[i1:i2].clone(), torch.zeros(i2 - i1, rows)
        for i in range(i2 - i1):
            col = i1 + i
            if search and col % g == 0:  # grid from the current, updated weights
                window = torch.cat([W1[i:], Wt[i2:]])[:g].t()
                scale[:, col // g], zero[:, col // g] = _group_grid(window, cfg, H, col)
                col_scale[col : col + g] = scale[:, col // g]
                col_zero[col : col + g] = zero[:, col // g]
            w, s, z, q, err = W1[i], col_scale[col], col_zero[col], codes[col], Err1[i]
            torch.div(w, s, out=q).add_(z).round_().clamp_(0, top)
            if keep is not None:  # z is an integer code: it dequantizes to 0
                torch.where(keep[col], q, z, out=q)
            # err = (w - (q - z) s) / d, in place: one pass per op, no temporaries
            torch.sub(q, z, out=err).mul_(s).sub_(w).div_(-diag[col])
            W1[i + 1 :].addr_(U[col, col + 1 : i2], err, alpha=-1.0)
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)
    codes = codes.t().to(torch.uint8)  # [rows, cols], processing order
    if static:  # groups follow original columns: store codes in original order
        out = torch.empty_like(codes)
        out[:, perm] = codes
        qw = QuantizedWeight.from_codes(
            out, scale, zero, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym
        )
    else:
        qw = QuantizedWeight.from_codes(
            codes,
            scale,
            zero,
            bits=cfg.bits,
            group_size=cfg.group_size,
            sym=cfg.sym,
            perm=perm if cfg.act_order else None,
        )
    return qw


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


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """||X(W - Wq)^T||^2 / ||XW^T||^2 over the calibration inputs, from H = sum x x^T."""
    D = W - Wq
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum().clamp_min(1e-12))


def gram(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """x^T y (y defaults to x) in fp32 for one batch [tokens, in], through oneDNN where available
    (about twice MKL's speed on some AMD CPUs). Always fp32 (see EXACT_ROWS for bf16 Hessians)."""
    xt = x.float().t().contiguous()
    yt = xt if y is None else y.float().t().contiguous()
    if onednn_available():
        return torch.ops.mkldnn._linear_pointwise(xt, yt, None, "none", [], "")
    return xt @ yt.t()


SYM_ROWS = 256  # rows of x^T x per product in the symmetric accumulation


def add_gram_upper(H: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
    """H <- beta H + alpha x^T x on and above the diagonal only, for x [tokens, in]: x^T x is
    symmetric, so its row blocks are multiplied from the diagonal rightwards (about 0.55-0.70x
    the work of the full product for 576-1536 inputs; the lower triangle of H is left stale,
    see `mirror_upper`). fp32 (autocast off), whatever the calibration passes run in."""
    d = x.shape[1]
    with torch.autocast("cpu", enabled=False):
        x = x.float()
        xt = x.t()
        for i, rows in _row_blocks(0, d):
            H[i : i + rows, i:].addmm_(xt[i : i + rows], x[:, i:], beta=beta, alpha=alpha)


def _row_blocks(start: int, stop: int) -> list[tuple[int, int]]:
    """(first row, rows) of equal row blocks of at most SYM_ROWS rows covering start..stop."""
    pieces = -(-(stop - start) // SYM_ROWS)
    rows = -(-(stop - start) // max(pieces, 1))
    return [(i, min(rows, stop - i)) for i in range(start, stop, rows)]


# bf16 Hessians (bf16 calibration passes only). oneDNN multiplies bf16 about 2.4x faster than
# fp32 on CPUs with native bf16 dot products, but rounds each product's outputs to bf16: on
# SmolLM2's outlier input channels (diagonal up to 370x the mean) the error of a plain bf16
# Hessian reached up to 27% of the mean diagonal, beyond what GPTQ's 1% dampening absorbs (block
# 0's o_proj needed 100x dampening, output error 4.5x). So the rows and columns of the
# EXACT_ROWS largest channels (largest mean square in the layer's first batch) are accumulated
# in fp32 beside the bf16 products and replace theirs: errors fall to 0.1-3% of the mean
# diagonal and GPTQ's output errors stay within 0.2% of the exact Hessian's on every layer
# measured (BENCHMARKS.md, session 19).
EXACT_ROWS = 32


def add_gram_upper_bf16(H: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
    """add_gram_upper from bf16 products (fp32 accumulation inside each, bf16 outputs)."""
    with torch.autocast("cpu", enabled=False):
        xb = x.bfloat16()
        xbt = xb.t()
        for i, rows in _row_blocks(0, x.shape[1]):
            H[i : i + rows, i:].mul_(beta).add_(xbt[i : i + rows] @ xb[:, i:], alpha=alpha)


def mirror_upper(H: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is H's (in place)."""
    upper = H.triu()
    return H.copy_(upper + upper.triu(1).t())


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class HessianAccumulator:
    """Running H = (2/n) sum x x^T per layer input. Layers fed the same tensor (q/k/v, gate/up)
    share one accumulation. Only the upper triangle is accumulated; `hessian` mirrors it. In
    bf16 calibration passes the products are bf16 (add_gram_upper_bf16) and the rows of the
    largest channels are accumulated in fp32 too, replacing theirs in `hessian`."""

    def __init__(self) -> None:
        self.H: dict[str, torch.Tensor] = {}
        self.C: dict[str, torch.Tensor] = {}  # X~^T X against a reference stream (add x_ref)
        self.n: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None  # (the last input, its owner)
        self._mirrored: set[str] = set()
        # bf16 passes: the largest input channels and their exact rows of H, [k] and [k, in]
        self.exact: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, name: str, x: torch.Tensor, x_ref: torch.Tensor | None = None) -> None:
        """Add a batch of inputs x [tokens, in]; with x_ref (the float model's inputs to the same
        layer for the same tokens) also accumulate C = (2/n) sum x_ref x^T."""
        if name in self.alias:
            return
        if self._last is not None and name not in self.H and _same_tensor(self._last[0], x):
            self.alias[name] = self._last[1]
            return
        self._last = (x, name)  # held, so no later tensor can reuse its memory and look equal
        if name not in self.H:
            self.H[name] = torch.zeros(x.shape[1], x.shape[1])
            self.n[name] = 0
            if calib_dtype() == torch.bfloat16 and x.shape[1] > EXACT_ROWS:
                top = torch.topk(x.detach().float().pow(2).sum(0), EXACT_ROWS).indices
                self.exact[name] = (top, torch.zeros(EXACT_ROWS, x.shape[1]))
            if x_ref is not None:
                self.C[name] = torch.zeros(x.shape[1], x.shape[1])
        n, k = self.n[name], x.shape[0]
        if name in self.exact:
            top, rows = self.exact[name]
            add_gram_upper_bf16(self.H[name], x, n / (n + k), 2.0 / (n + k))
            with torch.autocast("cpu", enabled=False):
                xf = x.float()
                rows.mul_(n / (n + k)).addmm_(xf.index_select(1, top).t(), xf, alpha=2.0 / (n + k))
        else:
            add_gram_upper(self.H[name], x, n / (n + k), 2.0 / (n + k))
        self._mirrored.discard(name)
        if x_ref is not None:
            self.C[name].mul_(n / (n + k)).add_(gram(x_ref, x), alpha=2.0 / (n + k))
        self.n[name] = n + k

    def hessian(self, name: str) -> torch.Tensor:
        owner = self.alias.get(name, name)
        if owner not in self._mirrored:
            mirror_upper(self.H[owner])
            if owner in self.exact:  # the largest channels' exact rows and columns
                top, rows = self.exact.pop(owner)
                both = rows[:, top]
                self.H[owner][top] = rows
                self.H[owner][:, top] = rows.t()
                self.H[owner][top[:, None], top] = (both + both.t()) / 2  # exactly symmetric
            self._mirrored.add(owner)
        return self.H[owner]

    def cross(self, name: str) -> torch.Tensor | None:
        return self.C.get(self.alias.get(name, name))


def gptq_block(
    block: nn.Module,
    sites: list,
    xs: list,
    kwargs: dict,
    cfg: GPTQ,
    errors: dict[str, float],
    layer_bits: Mapping[str, int] | None = None,
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
        stacks: dict[tuple, list] = {}  # layers sharing an input and a width quantize together
        for local in stage:
            s = by_local[local]
            c = layer_cfg(cfg, s.name, layer_bits or {})
            stacks.setdefault((acc.alias.get(local, local), c.bits), []).append((s, c))
        for (owner, _), members in stacks.items():
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
