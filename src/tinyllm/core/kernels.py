"""Fast fp32 inference linears on CPU through oneDNN.

PyTorch sends fp32 `nn.Linear` to MKL's sgemm, which takes a slow code path on AMD CPUs; oneDNN
with a weight pre-packed for the expected batch is 1.2-1.5x faster here on the shapes of small
LLMs (benchmarks/bench_kernels.py). `fast_linears(model)` swaps the model's fp32 linears for
packed ones for the duration of a block and restores the originals after, so the model a caller
holds is never changed. The packed copy costs the linears' weight bytes once more while active.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from tinyllm.util.device import module_device

log = logging.getLogger(__name__)


def onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


class OneDNNLinear(nn.Module):
    """Inference-only copy of an fp32 `nn.Linear` whose weight oneDNN has packed."""

    def __init__(self, linear: nn.Linear, batch_tokens: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_tokens)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


# A linear whose fp32 weight is larger than this keeps running on PyTorch's GEMM: oneDNN's
# packed copy would double it (a 128k-vocabulary head tied to its embeddings: 1 GB more).
PACK_LIMIT_BYTES = 512 << 20


def _swappable(module: nn.Module) -> bool:
    """A plain fp32 nn.Linear holding its weight (not, say, one that compressed-tensors
    decompresses on the fly), small enough to pack."""
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and isinstance(weight, torch.Tensor)
        and weight.dtype == torch.float32
        and weight.numel() * 4 <= PACK_LIMIT_BYTES
        and weight.device.type == "cpu"  # oneDNN's packed weights are CPU tensors
        and not module._forward_pre_hooks
    )


@contextlib.contextmanager
def fast_linears(model: nn.Module, batch_tokens: int | None = None) -> Iterator[nn.Module]:
    """Run the block with the model's fp32 linears on oneDNN; restore them afterwards."""
    if not onednn_available() or (torch.is_grad_enabled() and model.training):
        yield model
        return
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _swappable(child):
                    setattr(parent, name, OneDNNLinear(child, batch_tokens))
                    swapped.append((parent, name, child))
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


# --- Reproducible factorizations ------------------------------------------------------------
# MKL's LAPACK (Cholesky, its inverse, solves) splits its work by the thread count, so the last
# bits of its results change with it (1 against 2 threads on a 576 x 576 Hessian). GPTQ turns
# such bits into flipped roundings, the flips into different inputs for the next block, and two
# runs of one command with different thread counts (OMP_NUM_THREADS, CPU affinity) ended with 8-20%
# of their codes different. Factorizations run on one thread: the same inputs give the same bits
# whatever the thread count (they are a small part of a block's time; 2 threads were not faster).


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread (restored after)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --- Calibration precision -------------------------------------------------------------------
# Calibration passes (block forwards over 128 x 512 tokens) dominate the cost of GPTQ, AWQ,
# SparseGPT and Wanda. On CPUs with native bfloat16 dot products (AVX512_BF16, AMX) oneDNN runs
# bf16 matmuls 2.4-4x faster than fp32 ones. In bf16 the block's linears run under autocast
# (fp32 accumulation; the residual stream, norms and attention stay fp32). A block's output then
# differs from fp32 by about 1% of its update, an order of magnitude below 4-bit quantization
# error. Hessians (GPTQ, SparseGPT) then come from bf16 products too, with the rows and columns
# of the 32 largest input channels accumulated in fp32 (core.hessian.HessianAccumulator).
# float32 stays the default; on SmolLM2 GPTQ (4-bit g64, 3-bit g32), AWQ, SparseGPT and Wanda
# showed no loss in bf16 beyond their run-to-run spread (benchmarks/bench_hessian_bf16.py;
# benchmarks/HISTORY.md).

CALIB_DTYPES = ("auto", "float32", "bfloat16")
_CALIB_DTYPE: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar(
    "calib_dtype", default=torch.float32
)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (Linux cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    found = re.search(r"\b(avx512_bf16|amx_bf16)\b", flags)
    return bool(found) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_calib_dtype(name: str) -> torch.dtype:
    """'auto' -> bfloat16 where the CPU computes it natively, else float32."""
    if name not in CALIB_DTYPES:
        raise ValueError(f"calibration dtype must be one of {CALIB_DTYPES}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    return getattr(torch, name)


def calib_dtype() -> torch.dtype:
    """The precision calibration passes run in right now (float32 unless a step set it)."""
    return _CALIB_DTYPE.get()


@contextlib.contextmanager
def calibration_precision(dtype: torch.dtype) -> Iterator[None]:
    token = _CALIB_DTYPE.set(dtype)
    try:
        yield
    finally:
        _CALIB_DTYPE.reset(token)


@contextlib.contextmanager
def block_compute(block: nn.Module, batch_tokens: int | None = None) -> Iterator[nn.Module]:
    """How a calibration pass runs a block: fp32 oneDNN linears, or bf16 autocast."""
    if calib_dtype() == torch.bfloat16:
        with torch.autocast(module_device(block).type, dtype=torch.bfloat16):  # cpu or cuda
            yield block
    else:
        with fast_linears(block, batch_tokens):
            yield block
