"""Checks a model directory passes before any weight is allocated.

`config.json` is read as plain JSON first: its sizes must be integers within generous bounds (a
hidden size of 10**9 is refused here, naming the field, instead of ending in a MemoryError), and
an architecture transformers does not ship (one that needs the directory's own Python code) is
refused: tinyllm never runs code from a model directory. Then the model is built on the meta
device (shapes only, no memory) and every tensor shape it implies is compared with the shapes in
the safetensors headers, so a config that does not match its weights fails before loading.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyllm.errors import ModelLoadError

log = logging.getLogger(__name__)

# field -> (minimum, maximum). The maxima are far above any released model.
SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 16),
    "n_embd": (1, 1 << 16),
    "d_model": (1, 1 << 16),
    "word_embed_proj_dim": (1, 1 << 16),
    "intermediate_size": (1, 1 << 20),
    "ffn_dim": (1, 1 << 20),
    "n_inner": (1, 1 << 20),
    "moe_intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 1024),
    "n_layer": (1, 1024),
    "num_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "n_head": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 1 << 14),
    "num_local_experts": (1, 4096),
    "num_experts": (1, 4096),
    "max_position_embeddings": (1, 1 << 24),
    "n_positions": (1, 1 << 24),
    "sliding_window": (0, 1 << 24),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def read_config(directory: Path) -> dict[str, Any]:
    """config.json as a dict, refused if unreadable, absurd, or needing custom code."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, not {type(config).__name__}")
    check_architecture(config, path)
    check_sizes(config, path)
    return config


def check_architecture(config: dict[str, Any], path: Path) -> None:
    """Refuse a model_type transformers does not ship; code in the directory is never run."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    auto_map = config.get("auto_map")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(
            f"{path} has no model_type, so the architecture is unknown; add the model_type of "
            'the model it was made from (e.g. "llama")'
        )
    if model_type in CONFIG_MAPPING:
        if auto_map:
            log.info("%s: ignoring auto_map; using transformers' built-in %s", path, model_type)
        return
    if auto_map:
        raise ModelLoadError(
            f"{path}: model_type '{model_type}' needs the custom code the directory ships "
            f"(auto_map: {json.dumps(auto_map)[:200]}); tinyllm never runs code from a model "
            "directory (trust_remote_code is always off). Use a model whose architecture "
            "transformers implements"
        )
    raise ModelLoadError(
        f"{path}: model_type '{model_type}' is not an architecture this transformers knows; "
        "upgrade transformers, or fix the model_type"
    )


def check_sizes(config: dict[str, Any], path: Path, prefix: str = "") -> None:
    """Every size field (also in nested configs) must be an integer within SIZE_LIMITS."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            check_sizes(value, path, f"{name}.")
            continue
        if key not in SIZE_LIMITS or value is None:
            continue
        low, high = SIZE_LIMITS[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelLoadError(f"{path}: {name} must be an integer, not {value!r}")
        if not low <= value <= high:
            raise ModelLoadError(
                f"{path}: {name} = {value} is outside [{low}, {high}]; the config is corrupted "
                "or not a model tinyllm can load"
            )


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors headers only (no tensor data)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        for key, entry in read_header(f).items():
            if key != "__metadata__":
                shapes[key] = tuple(int(d) for d in entry["shape"])
    return shapes


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file; its length is checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise ModelLoadError(f"{path} is truncated: its header claims {n} bytes of {size}")
        return json.loads(f.read(n))


def meta_model(config: Any) -> nn.Module:
    """The model `config` describes, on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for configs it cannot build
        kind = getattr(config, "model_type", "?")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot build a '{kind}' causal language model: {first}") from exc


def expected_shapes(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(state-dict key -> shape, keys a checkpoint may lack: those sharing their tensor with an
    earlier key (tied) and those the model class lets transformers leave missing)."""
    ignore = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    shapes, optional, seen = {}, set(), set()
    for key, t in model.state_dict(keep_vars=True).items():
        shapes[key] = tuple(t.shape)
        if id(t) in seen or any(re.search(p, key) for p in ignore):
            optional.add(key)
        seen.add(id(t))
    return shapes, optional


def check_shapes(
    directory: Path,
    config: dict[str, Any],
    want: dict[str, tuple[int, ...]],
    have: dict[str, tuple[int, ...]],
    optional: set[str],
    prefix: str = "",
    strict_names: bool = False,
) -> None:
    """Compare the shapes the config implies (`want`) with the stored ones (`have`).

    Names are compared without the base-model `prefix`. Missing tensors are an error when the
    file uses the model's names (`strict_names`, or most stored names match); `optional` keys
    (tied weights) may be absent."""

    def norm(k: str) -> str:
        return k.removeprefix(prefix + ".") if prefix else k

    w = {norm(k): v for k, v in want.items()}
    h = {norm(k): v for k, v in have.items()}
    stored_name = {norm(k): k for k in have}
    for key in sorted(w.keys() & h.keys()):
        if w[key] != h[key]:
            name = stored_name[key]
            raise ModelLoadError(_shape_message(directory, config, name, w[key], h[key]))
    if not strict_names and 2 * len(w.keys() & h.keys()) < len(h):
        _check_total(directory, config, want, have)
        return
    may_lack = {norm(o) for o in optional}
    missing = [k for k in w if k not in h and k not in may_lack]
    if missing:
        raise ModelLoadError(_missing_message(directory, config, missing, w, h))


def _shape_message(directory: Path, config: dict, key: str, want: tuple, have: tuple) -> str:
    fields = []
    if len(want) == len(have):
        for e, f in zip(want, have, strict=True):
            if e != f:
                fields += [f"{k} = {v}" for k, v in _fields(config) if v == e]
    why = f" ({', '.join(dict.fromkeys(fields))} in config.json)" if fields else ""
    return (
        f"{directory}: config.json does not match the weights: {key} is stored as {list(have)} "
        f"but the config implies {list(want)}{why}; the config belongs to another model or was "
        "edited"
    )


def _missing_message(directory: Path, config: dict, missing: list[str], want: dict, have: dict):
    blocks_want, blocks_have = _block_count(want), _block_count(have)
    why = ""
    if blocks_want > blocks_have:
        fields = [f"{k} = {v}" for k, v in _fields(config) if v == blocks_want]
        names = ", ".join(fields) or f"{blocks_want} blocks"
        why = f"; config.json says {names} but the weights hold {blocks_have} blocks"
    return (
        f"{directory}: the weights lack {len(missing)} tensors the config implies "
        f"(first: {missing[0]}){why}; the checkpoint is incomplete or the config belongs to "
        "another model"
    )


def _check_total(directory: Path, config: dict, want: dict, have: dict) -> None:
    """Where names differ, at least refuse a config implying far more values than are stored."""
    implied = sum(_numel(s) for s in want.values())
    stored = sum(_numel(s) for s in have.values())
    if implied > 16 * stored + (1 << 20):
        fields = _fields(config)
        sizes = ", ".join(f"{k} = {v}" for k, v in fields if k.split(".")[-1] in SIZE_LIMITS)
        raise ModelLoadError(
            f"{directory}: config.json implies {implied:,} parameters but the weights hold "
            f"{stored:,} values; its sizes ({sizes}) do not match the weights"
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _block_count(shapes: dict[str, tuple]) -> int:
    """1 + the largest block index in the names ('model.layers.7.mlp...' -> 8)."""
    found = [int(m.group(1)) for k in shapes if (m := re.search(r"\.(\d+)\.", f".{k}"))]
    return max(found, default=-1) + 1


def _fields(config: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, value) of the integer fields of a config, nested ones included."""
    out = []
    for k, v in config.items():
        if isinstance(v, dict):
            out += _fields(v, f"{prefix}{k}.")
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append((f"{prefix}{k}", v))
    return out


def check_tokenizer_files(directory: Path) -> None:
    """A model directory must ship its tokenizer."""
    if not any((Path(directory) / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer files of the model it was made from into it"
        )


def check_vocab(directory: Path, tokenizer: Any, rows: int) -> None:
    """The tokenizer's ids must index the model's embedding (`rows` rows)."""
    base = int(getattr(tokenizer, "vocab_size", 0) or 0)
    total = len(tokenizer)
    if total < 1:
        raise ModelLoadError(f"{directory}: the tokenizer is empty; it is not usable")
    if base - rows > max(64, rows // 100):  # a few extra ids (image tokens) only warn
        raise ModelLoadError(
            f"{directory}: the tokenizer has {base} tokens but the model's embedding only "
            f"{rows} rows; the tokenizer belongs to another model"
        )
    if total > rows:
        log.warning(
            "%s: the tokenizer's ids reach %d, beyond the embedding's %d rows",
            directory,
            total - 1,
            rows,
        )
