"""Hugging Face export: a directory `AutoModelForCausalLM.from_pretrained` loads.

Float models (and structurally pruned ones, whose config already has the new shapes) are written
as plain safetensors checkpoints. Quantized models are written in the `compressed-tensors`
`pack-quantized` format (the one vLLM serves): per quantized linear `weight_packed` (codes as
signed integers packed into int32 by compressed-tensors' own packer), `weight_scale`,
`weight_zero_point` for asymmetric grids, `weight_shape`, and a `quantization_config` with one
scheme per distinct grid naming its layers. Our grid w = s (q - z) with q, z in [0, 2^b) is theirs
w = s (q' - z') with q' = q - 2^(b-1), z' = z - 2^(b-1); symmetric grids have z = 2^(b-1), z' = 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tinyllm.errors import ConfigError
from tinyllm.kernels.qlinear import QuantLinear
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.util.fs import atomic_dir

log = logging.getLogger(__name__)


def why_not_packable(qw: QuantizedWeight) -> str | None:
    """None when compressed-tensors' integer formats hold qw exactly, else the reason."""
    if qw.codebook is not None:
        return "codebook (NF4) values are not on an integer grid"
    if qw.kquant is not None:
        return (
            f"{qw.kquant} grids have float mins and super-block scales (export as GGUF {qw.kquant})"
        )
    if qw.perm is not None:
        return "columns are permuted (act-order without static groups)"
    return None


def _scheme_key(qw: QuantizedWeight) -> tuple[int, int, bool]:
    return qw.bits, qw.group_size, qw.sym


def _ct_tensors(qw: QuantizedWeight, prefix: str) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    half = 1 << (qw.bits - 1)
    signed = (qw.codes().to(torch.int16) - half).to(torch.int8)  # [out, in]
    out = {
        f"{prefix}.weight_packed": pack_to_int32(signed, qw.bits),
        f"{prefix}.weight_scale": qw.scale.to(torch.float16).contiguous(),
        f"{prefix}.weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
    }
    if not qw.sym:
        zp = (qw.zero.to(torch.int16) - half).to(torch.int8)  # [out, groups]
        packed = pack_to_int32(zp, qw.bits, packed_dim=0)  # [ceil(out * bits / 32), groups]
        # transformers builds the empty layer with an unpacked [out, groups] zero point and
        # refuses other shapes; the unpacker reads only the first out * bits bits of each column,
        # so the packed words go first and the rest is zero padding.
        padded = torch.zeros(zp.shape, dtype=torch.int32)
        padded[: packed.shape[0]] = packed
        out[f"{prefix}.weight_zero_point"] = padded
    return out


def _quantization_config(groups: dict[tuple[int, int, bool], list[str]], ignore: list[str]):
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    schemes = {}
    for i, ((bits, group, sym), names) in enumerate(sorted(groups.items())):
        args = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=sym,
            strategy="channel" if group == -1 else "group",
            group_size=None if group == -1 else group,
        )
        schemes[f"group_{i}"] = QuantizationScheme(targets=names, weights=args)
    cfg = QuantizationConfig(
        config_groups=schemes,
        format="pack-quantized",
        quantization_status="compressed",
        ignore=ignore,
    )
    return cfg.to_dict()


def _float_tensors(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """Every float parameter and persistent buffer not owned by a quantized layer; the tied head
    is left out (config.tie_word_embeddings restores it)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        owner = name.rsplit(".", 1)[0]
        if owner in skip and not name.endswith(".bias"):
            continue
        if id(t) in seen:  # tied weights: keep the first name only
            continue
        seen.add(id(t))
        out[name] = t.detach().contiguous()
    return out


def export_hf(
    model: nn.Module, tokenizer: Any, path: Path, strict: bool = False, **_: Any
) -> dict[str, Any]:
    """Write `model` as a Hugging Face directory; returns what was packed."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    report: dict[str, Any] = {"packed": [], "dequantized": {}}
    groups: dict[tuple[int, int, bool], list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in quantized.items():
        reason = why_not_packable(mod.qweight)
        if reason is not None:
            if strict:
                raise ConfigError(f"{name}: cannot write as compressed-tensors ({reason})")
            report["dequantized"][name] = reason
            continue
        groups.setdefault(_scheme_key(mod.qweight), []).append(name)
        tensors.update(_ct_tensors(mod.qweight, name))
        report["packed"].append(name)
    floats = _float_tensors(model, set(report["packed"]))
    for name, reason in report["dequantized"].items():
        log.warning("%s written as float weights: %s", name, reason)
        floats[f"{name}.weight"] = quantized[name].qweight.dequantize()
    dtype = torch.float16 if all(_fp16_exact(t) for t in floats.values()) else torch.float32
    tensors.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in floats.items()})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    if report["packed"]:
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        config["quantization_config"] = _quantization_config(groups, ignore)
    with atomic_dir(Path(path)) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
    return report


def _fp16_exact(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or torch.equal(t.to(torch.float16).float(), t.float())
