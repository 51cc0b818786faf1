"""Shared glue for weight-only quantizers: config fields, validation, layer walking, errors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from pydantic import field_validator, model_validator
from torch import nn

from tinyllm.core.calib import for_each_block
from tinyllm.core.steps import Context, Step
from tinyllm.errors import ArchitectureError, ConfigError
from tinyllm.kernels.kgrid import KSPECS, SUPER
from tinyllm.kernels.primitives import SUPPORTED_BITS, SUPPORTED_GROUPS
from tinyllm.kernels.qlinear import replace_linear
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.models.anatomy import LinearSite, analyze

log = logging.getLogger(__name__)
Q = TypeVar("Q", bound="WeightQuant")


# The legacy GGUF block types as tinyllm grids: (bits, group size, symmetric). Each block of 32
# holds its codes, a float16 scale and, when asymmetric, a float16 min.
LEGACY_GRIDS: dict[str, tuple[int, int, bool]] = {
    "q4_0": (4, 32, True),
    "q4_1": (4, 32, False),
    "q5_0": (5, 32, True),
    "q5_1": (5, 32, False),
    "q8_0": (8, 32, True),
}

# The GGUF type whose grid a layer gets under `kquant` when its input features are not whole K
# super-blocks: the type it is exported as (export/gguf_blocks.py K_FALLBACK, llama-quantize's).
K_FALLBACK_GRID: dict[str, str] = {
    "q2_k": "q4_0",
    "q3_k": "q4_0",
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
}
# non-uniform GGUF grids (kernels/iq4grid.py): 4-bit codes, groups of 32 (IQ4_XS: their scales
# on a 6-bit grid per super-block of 256)
CODEBOOKS = ("iq4_nl", "iq4_xs")
GGUF_GRID_TYPES = (*LEGACY_GRIDS, *CODEBOOKS, *KSPECS)  # every GGUF type a layer can be put on


def gguf_grid(name: str) -> dict:
    """The WeightQuant fields that put a layer on GGUF type `name`'s grid."""
    if name in KSPECS:
        spec = KSPECS[name]
        grid = {"bits": spec.bits, "group_size": spec.sub, "sym": spec.signed}
        return {"kquant": name, "codebook": None, **grid}
    if name in CODEBOOKS:
        return {"kquant": None, "codebook": name, "bits": 4, "group_size": 32, "sym": True}
    if name not in LEGACY_GRIDS:
        raise ValueError(f"unknown GGUF type {name!r}; choose among {', '.join(GGUF_GRID_TYPES)}")
    bits, group, sym = LEGACY_GRIDS[name]
    return {"kquant": None, "codebook": None, "bits": bits, "group_size": group, "sym": sym}


def gguf_bpw(name: str) -> float:
    """Bits per weight of GGUF type `name`'s blocks, scales (and mins) included."""
    if name in KSPECS:
        return KSPECS[name].bpw
    if name == "iq4_xs":
        return 4.25  # 4-bit indices, 6 bits per 32, a float16 d per 256
    if name in CODEBOOKS:
        return 4.5  # 4-bit indices and a float16 scale per 32
    bits, group, sym = LEGACY_GRIDS[name]
    return bits + 16 / group * (1 if sym else 2)


def gguf_fits(name: str, in_features: int) -> bool:
    """Whether rows of `in_features` are whole blocks of GGUF type `name`."""
    return in_features % (SUPER if name in KSPECS or name == "iq4_xs" else 32) == 0


def gguf_type_bits(out_features: int, in_features: int, types: list[str]) -> list[int]:
    """Bits of an [out, in] weight stored as each GGUF type (exact: whole blocks). A type whose
    blocks do not tile the rows costs as much as the costliest type that does (callers give it
    an infinite loss, so it is never chosen)."""
    row = [
        round(out_features * in_features * gguf_bpw(t)) if gguf_fits(t, in_features) else -1
        for t in types
    ]
    return [c if c >= 0 else max(row) for c in row]


class WeightQuant(Step):
    """Fields every integer weight quantizer shares. `kquant` (a llama.cpp K-quant type) puts
    each layer on that type's super-block grid (kernels/kgrid.py) and sets bits, group size
    and symmetry to the type's; layers whose inputs are not whole super-blocks of 256 get the
    grid of the type llama.cpp falls back to (K_FALLBACK_GRID). `codebook` (iq4_nl, iq4_xs) puts
    each layer on llama.cpp's non-uniform IQ4_NL table (kernels/iq4grid.py), 4 bits, groups of
    32; iq4_xs puts the groups' scales on its super-block grid too (IQ4_NL's for rows not whole
    super-blocks, as llama.cpp falls back)."""

    bits: int = 4
    group_size: int = 64
    sym: bool = False
    kquant: str | None = None
    codebook: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _kquant_grid(cls, data: dict) -> dict:
        if not isinstance(data, dict):
            return data
        if data.get("codebook") is not None:
            if data["codebook"] not in CODEBOOKS:
                got = data["codebook"]
                raise ValueError(f"codebook must be one of {', '.join(CODEBOOKS)}, got {got!r}")
            if data.get("kquant") is not None:
                raise ValueError("a layer is on a K-quant grid or a codebook, not both")
            grid = {"bits": 4, "group_size": 32, "sym": True}
            for key, value in grid.items():
                if data.get(key) is not None and data[key] != value:
                    raise ValueError(f"{data['codebook']} fixes {key} at {value}, got {data[key]}")
            return {**data, **grid}
        if data.get("kquant") is None:
            return data
        name = data["kquant"]
        if name not in KSPECS:
            raise ValueError(f"kquant must be one of {', '.join(KSPECS)}, got {name!r}")
        spec = KSPECS[name]
        grid = {"bits": spec.bits, "group_size": spec.sub, "sym": spec.signed}
        for key, value in grid.items():
            if data.get(key) is not None and data[key] != value:
                raise ValueError(f"{name} fixes {key} at {value}, got {data[key]}")
        return {**data, **grid}

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (*SUPPORTED_BITS, 6):
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in (*SUPPORTED_GROUPS, 16):
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUPS}, got {v}")
        return v

    @model_validator(mode="after")
    def _plain_grid(self) -> WeightQuant:
        if self.kquant is None and self.bits == 6:
            raise ValueError(
                f"bits must be one of {SUPPORTED_BITS}, got 6 (6-bit codes exist only as the "
                "q6_k K-quant grid: --gguf-compatible q6_k)"
            )
        if self.kquant is None and self.group_size == 16:
            raise ValueError(
                f"group_size must be one of {SUPPORTED_GROUPS}, got 16 (groups of 16 exist only "
                "in K-quant grids: --gguf-compatible q2_k, q3_k or q6_k)"
            )
        return self


def layer_cfg(cfg: Q, name: str, layer_bits: Mapping[str, int | str], in_features: int = 0) -> Q:
    """The config one layer is quantized with: `cfg`, with its bit width overridden when
    `layer_bits` (Context.layer_bits, mixed precision) names the layer, its whole grid when the
    entry is a GGUF type name (mixed over GGUF types), and under `kquant` the fallback grid when
    its `in_features` are not whole K super-blocks."""
    choice = layer_bits.get(name)
    if isinstance(choice, str):
        return type(cfg).model_validate({**cfg.model_dump(), **gguf_grid(choice)})
    if cfg.kquant is not None and in_features % SUPER:
        update = gguf_grid(K_FALLBACK_GRID[cfg.kquant])
        return type(cfg).model_validate({**cfg.model_dump(), **update})
    bits = layer_bits.get(name)
    if bits is None or bits == cfg.bits:
        return cfg
    if cfg.kquant is not None:
        raise ConfigError(f"{name}: mixed bit widths cannot change a {cfg.kquant} grid")
    return cfg.model_copy(update={"bits": bits})


def check_divisible(sites: list[LinearSite], group_size: int) -> None:
    """Refuse group sizes that do not divide a layer's input features, naming the layer."""
    if group_size == -1:
        return
    for s in sites:
        if s.module.in_features % group_size:
            raise ConfigError(
                f"group size {group_size} does not divide the {s.module.in_features} input "
                f"features of {s.name}; use a divisor (for example 32 or 64) or -1 (per channel)"
            )


def target_linears(model: nn.Module) -> list[LinearSite]:
    sites = [s for s in analyze(model).linears if isinstance(s.module, nn.Linear)]
    if not sites:
        raise ArchitectureError("no float linear layers left to quantize in the decoder blocks")
    return sites


def sites_by_block(model: nn.Module, group_size: int) -> dict[int, list[LinearSite]]:
    """The block linears to quantize, checked against the group size, grouped by block index."""
    sites = target_linears(model)
    check_divisible(sites, group_size)
    by_block: dict[int, list[LinearSite]] = {}
    for s in sites:
        by_block.setdefault(s.block, []).append(s)
    return by_block


def relative_weight_error(w: torch.Tensor, qw: QuantizedWeight) -> float:
    return float((qw.dequantize() - w).norm() / w.norm().clamp_min(1e-12))


def quantize_each(
    model: nn.Module, ctx: Context, group_size: int, fn: Callable[[torch.Tensor], QuantizedWeight]
) -> None:
    """Data-free glue: quantize every block linear's weight with fn and swap in a QuantLinear."""
    quantize_each_layer(model, ctx, group_size, lambda w, _name: fn(w))


def quantize_each_layer(
    model: nn.Module,
    ctx: Context,
    group_size: int,
    fn: Callable[[torch.Tensor, str], QuantizedWeight],
) -> None:
    """quantize_each, with fn(weight, full layer name) for methods that vary per layer."""
    # by block, popped as each block is done: a site holds its linear, and a linear swapped out
    # for a packed one must be freed then (a streamed model would otherwise keep every block)
    by_block = sites_by_block(model, group_size)
    errors = ctx.report.setdefault("layer_errors", {})

    def quantize_block(i: int, _block: nn.Module) -> None:
        for s in by_block.pop(i, []):
            w = s.module.weight.detach().float()
            qw = fn(w, s.name)
            errors[s.name] = relative_weight_error(w, qw)
            replace_linear(model, s.name, qw)

    for_each_block(model, quantize_block)  # block by block: streamed models work too


def block_error_status(by_block: dict[int, list[LinearSite]], errors: dict[str, float]):
    """Progress-bar text: the mean reconstruction error of the block just finished. It keeps
    the layer names only, as the glue pops each block's sites when it quantizes the block: a
    site holds its linear, and a linear swapped out for a packed one must be freed then."""
    names = {i: [s.name for s in sites] for i, sites in by_block.items()}

    def status(i: int) -> str:
        errs = [errors[n] for n in names.get(i, []) if n in errors]
        return f"mean layer error {sum(errs) / len(errs):.2e}" if errs else ""

    return status


def fake_quant_then_swap(
    block: nn.Module, records: dict[str, QuantizedWeight]
) -> Callable[[], None]:
    """Put each record's dequantized weight in its float linear, so the block's outputs (the next
    block's calibration inputs) see the quantization; return the callable that swaps in packed
    QuantLinear modules once those outputs are computed."""
    for local, qw in records.items():
        block.get_submodule(local).weight.data = qw.dequantize()

    def finish() -> None:
        for local, qw in records.items():
            replace_linear(block, local, qw)

    return finish
