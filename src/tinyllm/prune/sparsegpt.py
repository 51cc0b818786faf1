"""SparseGPT (Frantar & Alistarh 2023): prune columns left to right, choosing the mask of each
block of 128 columns by the OBS saliency w^2 / [H^-1]_jj^2 and pushing each removed weight's error
onto the columns not yet processed through the inverse Hessian (the same lazy-batch, Cholesky
machinery as GPTQ). With `bits`, each kept weight is also rounded to a GPTQ grid in the same pass
(pruned weights stay exactly zero: the grids hold an integer zero point)."""

from __future__ import annotations

import torch
from pydantic import field_validator
from torch import nn

from tinyllm.core.calib import calibrate_blocks, observe_block
from tinyllm.core.hessian import HessianAccumulator, inverse_cholesky, output_error, prepare_layer
from tinyllm.core.steps import Context, register
from tinyllm.kernels.primitives import SUPPORTED_BITS, group_qparams, qmax
from tinyllm.kernels.qlinear import replace_linear
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.prune.common import PruneStep
from tinyllm.prune.owl import pruning_plan


class SparseGPT(PruneStep):
    calibrated = True
    damp: float = 0.01
    block_size: int = 128
    bits: int | None = None  # fuse quantization: 2, 3, 4, 5 or 8 bits
    group_size: int = 128  # with bits: 32, 64 or 128 (a divisor of block_size)
    sym: bool = False

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128, got {v}")
        return v

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int | None) -> int | None:
        if v is not None and v not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {v}")
        return v


def _prune_mask(W1: torch.Tensor, d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight of this column block is removed: the lowest w^2 / d^2."""
    sal = W1.pow(2) / d.pow(2)[None, :]
    k = int(sal.numel() * sparsity)
    mask = torch.zeros_like(W1, dtype=torch.bool)
    if k:
        mask.view(-1)[sal.reshape(-1).topk(k, largest=False).indices] = True
    return mask


def sparsegpt_prune(
    W: torch.Tensor, H: torch.Tensor, cfg: SparseGPT, sparsity: float, name: str = "layer"
) -> tuple[torch.Tensor, QuantizedWeight | None, float]:
    """[out, in] weight, [in, in] Hessian -> (pruned weight, its record if quantized, error)."""
    W, H = prepare_layer(W, H)
    rows, cols = W.shape
    H0, W0 = H.clone(), W.clone()
    U = inverse_cholesky(H, cfg.damp, name)
    nm = cfg.nm
    quant = cfg.bits is not None
    g = cols if cfg.group_size == -1 else cfg.group_size
    codes = torch.zeros(rows, cols)
    scale = torch.zeros(rows, max(cols // g, 1))
    zero = torch.zeros_like(scale)
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1)
        d = U.diagonal()[i1:i2]
        prune = _prune_mask(W1, d, sparsity) if nm is None else torch.zeros_like(W1, dtype=bool)
        for i in range(i2 - i1):
            col = i1 + i
            if nm is not None and i % nm[1] == 0:
                sal = W1[:, i : i + nm[1]].pow(2) / d[i : i + nm[1]].pow(2)[None, :]
                drop = sal.topk(nm[1] - nm[0], dim=1, largest=False).indices
                prune[:, i : i + nm[1]].scatter_(1, drop, True)
            if quant and col % g == 0:  # grid of the group from the kept, updated weights
                window = W1[:, i : i + g] * ~prune[:, i : i + g]
                s, z = group_qparams(window, cfg.bits, -1, cfg.sym)
                scale[:, col // g], zero[:, col // g] = s[:, 0].half().float(), z[:, 0]
            w = W1[:, i]
            q = w.masked_fill(prune[:, i], 0.0)
            if quant:
                s, z = scale[:, col // g], zero[:, col // g]
                c = (q / s + z).round().clamp(0, qmax(cfg.bits))
                c = torch.where(prune[:, i], z, c)  # removed weights: exactly zero
                codes[:, col] = c
                q = s * (c - z)
            err = (w - q) / U[col, col]
            W1[:, i:].addr_(err, U[col, i1 + i : i2], alpha=-1.0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    record = None
    if quant:
        record = QuantizedWeight.from_codes(
            codes.to(torch.uint8),
            scale,
            zero,
            bits=cfg.bits,
            group_size=cfg.group_size,
            sym=cfg.sym,
        )
        W = record.dequantize()
    return W, record, output_error(W0, W, H0)


@register(SparseGPT)
def apply(model: nn.Module, cfg: SparseGPT, ctx: Context) -> None:
    groups, per_block = pruning_plan(model, cfg, ctx)
    sparsity = ctx.report.setdefault("layer_sparsity", {})
    errors = ctx.report.setdefault("layer_errors", {})

    def prune_block(i: int, block: nn.Module, xs: list, kwargs: dict):
        acc = HessianAccumulator()
        observe_block(block, xs, kwargs, [s.local for s in groups[i]], acc.add)
        records = {}
        for s in groups[i]:
            w, rec, errors[s.name] = sparsegpt_prune(
                s.module.weight, acc.hessian(s.local), cfg, per_block[i], s.name
            )
            s.module.weight.data = w
            sparsity[s.name] = float((w == 0).float().mean())
            if rec is not None:
                records[s.local] = rec

        def finish() -> None:
            for local, rec in records.items():
                replace_linear(block, local, rec)

        return finish if records else None

    calibrate_blocks(model, ctx.calib, ctx.batch_size, prune_block, "SparseGPT")
