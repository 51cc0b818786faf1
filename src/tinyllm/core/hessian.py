"""Hessians of a layer's inputs, H = (2/n) sum x x^T, and what second-order methods do with them
(inverse Cholesky factor, output error): shared by GPTQ, SparseGPT and AWQ's GPTQ base."""

from __future__ import annotations

import logging

import torch

from tinyllm.core.kernels import calib_dtype, one_thread, onednn_available
from tinyllm.errors import ConfigError
from tinyllm.util import dist

log = logging.getLogger(__name__)


def inverse_cholesky(
    H: torch.Tensor, damp: float, name: str, order: torch.Tensor | None = None
) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag) I)^-1, retrying with more damping; with
    `order`, of H with its rows and columns in that order (GPTQ's act-order), permuted straight
    into the matrix that is factored, so no other [in, in] copy is alive. On one thread, so its
    bits do not depend on the thread count (core.kernels.one_thread)."""
    with one_thread():
        return _inverse_cholesky(H, damp, name, order)


def _inverse_cholesky(
    H: torch.Tensor, damp: float, name: str, order: torch.Tensor | None
) -> torch.Tensor:
    for _ in range(6):
        # one [in, in] matrix besides H at a time: on a 14336-wide down_proj, 0.8 GB each
        # (in place: the same LAPACK calls, the same bits as out-of-place)
        L = H.clone() if order is None else permuted(H, order)
        L.diagonal().add_(damp * L.diagonal().mean())
        info = torch.empty((), dtype=torch.int32)
        torch.linalg.cholesky_ex(L, out=(L, info))
        if info == 0:
            torch.cholesky_inverse(L, out=L)
            torch.linalg.cholesky_ex(L, upper=True, out=(L, info))
            if info == 0:
                return L
        log.warning("%s: Cholesky failed with damp %.3g, retrying with %.3g", name, damp, damp * 10)
        damp *= 10
    raise ConfigError(f"{name}: Hessian is not positive definite even with damp {damp:.3g}")


def permuted(H: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """H[order][:, order], a row panel at a time (no second [in, in] temporary)."""
    out = torch.empty_like(H)
    for i, rows in _row_blocks(0, H.shape[0]):
        out[i : i + rows] = H.index_select(0, order[i : i + rows]).index_select(1, order)
    return out


def prepare_layer(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float copies of a weight and its Hessian; inputs never seen in calibration (zero diagonal)
    get a unit diagonal and zero weights, so the inverse exists."""
    W = W.detach().float().clone()
    dead = H.diagonal() == 0
    if bool(dead.any()) or H.dtype != torch.float32:  # else H itself: it is only read
        H = H.float().clone()
        H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


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
# measured (benchmarks/bench_hessian_bf16.py; benchmarks/HISTORY.md).
EXACT_ROWS = 32


def add_gram_upper_bf16(H: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
    """add_gram_upper from bf16 products (fp32 accumulation inside each, bf16 outputs)."""
    with torch.autocast("cpu", enabled=False):
        xb = x.bfloat16()
        xbt = xb.t()
        for i, rows in _row_blocks(0, x.shape[1]):
            H[i : i + rows, i:].mul_(beta).add_(xbt[i : i + rows] @ xb[:, i:], alpha=alpha)


def mirror_upper(H: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is H's, in place: each row panel's part left
    of the diagonal is copied from the column panel above it, so no [in, in] temporary exists
    (a 14336-wide Hessian is 0.8 GB)."""
    for i, rows in _row_blocks(0, H.shape[0]):
        panel = H[i : i + rows, : i + rows]  # rows i.., columns up to the panel's own end
        panel.copy_(torch.where(_lower_mask(rows, i), H[: i + rows, i : i + rows].t(), panel))
    return H


def _lower_mask(rows: int, start: int) -> torch.Tensor:
    """[rows, start + rows] True strictly below the diagonal of rows start.. of a matrix."""
    r = torch.arange(start, start + rows)[:, None]
    return torch.arange(start + rows)[None, :] < r


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class HessianAccumulator:
    """Running H = (2/n) sum x x^T per layer input. Layers fed the same tensor (q/k/v, gate/up)
    share one accumulation. Only the upper triangle is accumulated; `hessian` mirrors it. In
    bf16 calibration passes the products are bf16 (add_gram_upper_bf16) and the rows of the
    largest channels are accumulated in fp32 too, replacing theirs in `hessian`. Under several
    processes (torchrun) each rank adds its own calibration tokens; the first `hessian` or
    `cross` after adds sums every rank's statistics (`reduce`), so all ranks read the Hessian of
    all the tokens."""

    def __init__(self) -> None:
        self.H: dict[str, torch.Tensor] = {}
        self.C: dict[str, torch.Tensor] = {}  # X~^T X against a reference stream (add x_ref)
        self.n: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None  # (the last input, its owner)
        self._mirrored: set[str] = set()
        self._pending: set[str] = set()  # owners with tokens added since the last reduce
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
                dist.refuse(
                    "a bf16 calibration Hessian",
                    "its exactly accumulated channels are picked from each process's first batch",
                    "use --calib-dtype float32",
                )
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
        self._pending.add(name)
        if x_ref is not None:
            self.C[name].mul_(n / (n + k)).add_(gram(x_ref, x), alpha=2.0 / (n + k))
        self.n[name] = n + k

    def reduce(self) -> None:
        """Sum every rank's statistics of the layers added to since the last reduce (all ranks
        call it at the same point: the names are the same on every rank); a no-op in a single
        process. Each running mean H = (2/n) sum x x^T is weighted by its n, summed, divided by
        the total: the mean over every rank's tokens, up to float summation order."""
        names, self._pending = sorted(self._pending), set()
        if dist.world() == 1 or not names:
            return
        local = torch.tensor([float(self.n[k]) for k in names], dtype=torch.float64)
        total = dist.all_reduce_sum(local.clone())
        for k, n, t in zip(names, local.tolist(), total.tolist(), strict=True):
            for mats in (self.H, self.C):
                if k in mats:
                    dist.all_reduce_sum(mats[k].mul_(n / t))
            self.n[k] = int(t)

    def hessian(self, name: str) -> torch.Tensor:
        self.reduce()
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
        self.reduce()
        return self.C.get(self.alias.get(name, name))
