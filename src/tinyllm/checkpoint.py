"""tinyllm output directories: a compressed model that `tinyllm.load` reads back exactly.

Layout: `config.json` and tokenizer files (Hugging Face), `model.safetensors` holding the float
tensors (as float16 or bfloat16 where that is lossless) plus every QuantizedWeight record (packed
codes, scales, zero points), and `tinyllm.json` naming the quantized layers, the steps that made
the model and the software versions. The directory is built under a temporary name and renamed
when complete, so a killed run never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tinyllm.errors import ConfigError, ModelLoadError
from tinyllm.quant.qlinear import QuantLinear, replace_linear
from tinyllm.quant.qweight import QuantizedWeight
from tinyllm.util.fs import atomic_dir

FORMAT_VERSION = 1
TINYLLM_CONFIG = "tinyllm.json"
WEIGHTS = "model.safetensors"


def check_output_dir(path: Path, overwrite: bool) -> None:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise ConfigError(f"output {path} exists and is not empty; pass --overwrite to replace it")


def round_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Round the model's float parameters (embeddings, norms, head, unquantized linears) to `dtype`
    values in place, keeping float32 storage in memory, so a checkpoint that stores them as
    `dtype` reloads to exactly this model."""
    for p in model.parameters():
        if p.dtype == torch.float32:
            p.data = p.data.to(dtype).float()


def _compact(t: torch.Tensor) -> torch.Tensor:
    """Store float32 tensors as float16 or bfloat16 when that is lossless."""
    if t.dtype != torch.float32:
        return t
    for dtype in (torch.float16, torch.bfloat16):
        small = t.to(dtype)
        if torch.equal(small.float(), t):
            return small
    return t


def _tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is emb.weight


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    path: Path,
    meta: dict[str, Any],
    overwrite: bool = False,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write model, tokenizer and `meta` (steps, source) atomically to `path`."""
    path = Path(path)
    check_output_dir(path, overwrite)
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            tensors.update(mod.qweight.tensors(f"{name}.record"))
            quantized[name] = mod.qweight.meta()
    tied = _tied(model)
    for key, value in model.state_dict().items():
        if tied and key == _head_key(model):
            continue
        tensors[key] = _compact(value.detach().contiguous().clone())
    info = {
        "format": FORMAT_VERSION,
        "quantized": quantized,
        "tied_embeddings": tied,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        **meta,
    }
    with atomic_dir(path) as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_text(json.dumps(data, indent=2) + "\n")
        (tmp / TINYLLM_CONFIG).write_text(json.dumps(info, indent=2) + "\n")  # last: marks complete
    return path


def _head_key(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    for name, mod in model.named_modules():
        if mod is head:
            return f"{name}.weight"
    return ""


def load_checkpoint(path: Path) -> tuple[nn.Module, Any]:
    """Rebuild the model from config, swap in QuantLinear records, load the float tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinyllm.models.load import check_safetensors_dir, load_tokenizer

    path = Path(path)
    try:
        info = json.loads((path / TINYLLM_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / TINYLLM_CONFIG} is unreadable: {exc}") from exc
    if info.get("format") != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: unknown tinyllm format {info.get('format')!r}")
    check_safetensors_dir(path)
    tensors = load_file(str(path / WEIGHTS))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).float()
    for name, meta in info["quantized"].items():
        replace_linear(model, name, QuantizedWeight.from_tensors(tensors, f"{name}.record", meta))
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in tensors.items()
        if ".record." not in k
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (info.get("tied_embeddings") and k == _head_key(model))]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: checkpoint does not match its config "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    if info.get("tied_embeddings"):
        model.tie_weights()
    model.name_or_path = str(path)
    return model.eval(), load_tokenizer(path)
