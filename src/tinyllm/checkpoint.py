"""tinyllm output directories: a compressed model that `tinyllm.load` reads back exactly.

Layout: `config.json` and tokenizer files (Hugging Face), `model.safetensors` holding the float
tensors (as float16 or bfloat16 where that is lossless) plus every QuantizedWeight record (packed
codes, scales, zero points); pruned float linears (at least 5% zeros) are stored sparse, a bitmask
of the kept positions plus the kept values, so the file shrinks with sparsity; and `tinyllm.json`
naming the quantized and sparse layers, the steps that made the model and the software versions.
The directory is built under a temporary name and renamed when complete, so a killed run never
leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tinyllm.errors import ConfigError, ModelLoadError
from tinyllm.quant.actquant import ActivationQuant
from tinyllm.quant.qlinear import (
    ActQuantLinear,
    QuantEmbedding,
    QuantLinear,
    replace_act_linear,
    replace_embedding,
    replace_linear,
)
from tinyllm.quant.qweight import QuantizedWeight
from tinyllm.util.fs import atomic_dir

FORMAT_VERSION = 1
TINYLLM_CONFIG = "tinyllm.json"
WEIGHTS = "model.safetensors"


def prior_steps(spec: str | Path) -> list:
    """The steps recorded in a tinyllm directory (none for any other model spec)."""
    path = Path(spec) / TINYLLM_CONFIG
    return json.loads(path.read_text()).get("steps", []) if path.is_file() else []


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
    """Float tied embeddings (a quantized tied head shares its record instead)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    a, b = getattr(head, "weight", None), getattr(emb, "weight", None)
    return a is not None and a is b


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
    written: dict[int, str] = {}  # a record shared by a tied head is stored once
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear | QuantEmbedding | ActQuantLinear):
            continue
        if id(mod.qweight) in written:
            quantized[name] = {**mod.qweight.meta(), "tied_to": written[id(mod.qweight)]}
            continue
        written[id(mod.qweight)] = name
        tensors.update(mod.qweight.tensors(f"{name}.record"))
        quantized[name] = mod.qweight.meta()
        if isinstance(mod, QuantEmbedding):
            quantized[name]["kind"] = "embedding"
        if isinstance(mod, ActQuantLinear):  # the input's quantization (W8A8, FP8)
            quantized[name]["act"] = mod.act.meta()
            tensors.update(mod.act.tensors(f"{name}.act"))
    tied = _tied(model)
    sparse = _sparse_linears(model)
    for key, value in model.state_dict().items():
        if tied and key == _head_key(model):
            continue
        if key in sparse:
            tensors.update(_sparse_tensors(key, value))
            continue
        tensors[key] = _compact(value.detach().contiguous().clone())
    info = {
        "format": FORMAT_VERSION,
        "quantized": quantized,
        "sparse": {k: list(v) for k, v in sparse.items()},
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


def _sparse_linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """State-dict keys of float block linears with enough exact zeros to store sparsely."""
    from tinyllm.models.anatomy import analyze
    from tinyllm.prune.common import SPARSE_MIN

    out = {}
    for s in analyze(model).linears:
        if isinstance(s.module, nn.Linear):
            w = s.module.weight.detach()
            if float((w == 0).float().mean()) >= SPARSE_MIN:
                out[f"{s.name}.weight"] = tuple(w.shape)
    return out


def _sparse_tensors(key: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A bitmask of the nonzero positions (1 bit per weight) plus the kept values."""
    keep = (w != 0).reshape(-1)
    bits = torch.from_numpy(np.packbits(keep.numpy()))
    return {f"{key}.mask": bits, f"{key}.values": _compact(w.detach().reshape(-1)[keep].clone())}


def _dense(tensors: dict[str, torch.Tensor], key: str, shape: list[int]) -> torch.Tensor:
    n = shape[0] * shape[1]
    keep = torch.from_numpy(np.unpackbits(tensors[f"{key}.mask"].numpy(), count=n).astype(bool))
    w = torch.zeros(n)
    w[keep] = tensors[f"{key}.values"].float()
    return w.reshape(shape)


def _is_act_tensor(key: str, quantized: dict) -> bool:
    """An activation-quantization tensor ('<layer>.act.scale'), not a model parameter."""
    name, _, leaf = key.rpartition(".act.")
    return bool(name) and leaf in ("scale", "zero") and "act" in quantized.get(name, {})


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
    records: dict[str, QuantizedWeight] = {}
    for name, meta in info["quantized"].items():
        if "tied_to" in meta:
            qw = records[meta["tied_to"]]
        else:
            qw = records[name] = QuantizedWeight.from_tensors(tensors, f"{name}.record", meta)
        if meta.get("kind") == "embedding":
            replace_embedding(model, name, qw)
        elif "act" in meta:
            act = ActivationQuant.from_tensors(tensors, f"{name}.act", meta["act"])
            replace_act_linear(model, name, qw, act)
        else:
            replace_linear(model, name, qw)
    sparse = info.get("sparse", {})
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in tensors.items()
        if ".record." not in k
        and not _is_act_tensor(k, info["quantized"])
        and not k.endswith((".weight.mask", ".weight.values"))
    }
    state.update({k: _dense(tensors, k, shape) for k, shape in sparse.items()})
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
