"""tinyllm output directories: a compressed model that `tinyllm.load` reads back exactly.

Layout: `config.json` and tokenizer files (Hugging Face), `model.safetensors` holding the float
tensors (as float16 or bfloat16 where that is lossless) plus every QuantizedWeight record (packed
codes, scales, zero points); pruned float linears (at least 5% zeros) are stored sparse, a bitmask
of the kept positions plus the kept values, so the file shrinks with sparsity; and `tinyllm.json`
naming the quantized and sparse layers, the steps that made the model, the software versions and
the sha256 digest of each weight file (verified on load; `verify=False` / `--no-verify` skips it).
The directory is built under a temporary name, flushed to disk and swapped in when complete (see
`util.fs.atomic_dir`), so a killed run leaves the complete old or the complete new checkpoint.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from safetensors.torch import save_file
from torch import nn

from tinyllm.errors import ConfigError, ModelLoadError
from tinyllm.kernels.actquant import ActivationQuant
from tinyllm.kernels.kgrid import SUPER, kspec
from tinyllm.kernels.qlinear import (
    ActQuantLinear,
    QuantEmbedding,
    QuantLinear,
    drop_records,
    replace_act_linear,
    replace_embedding,
    replace_linear,
)
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.models.anatomy import analyze
from tinyllm.models.lazy import LazyWeights, compute_in_float32, read_file, skeleton
from tinyllm.models.load import check_safetensors_dir, load_config, load_tokenizer
from tinyllm.models.sparsity import SPARSE_MIN
from tinyllm.models.validate import (
    check_shapes,
    check_vocab,
    expected_shapes,
    meta_model,
    read_config,
)
from tinyllm.util.fs import OUTPUT_MARKER, atomic_dir, sha256_file
from tinyllm.util.memory import trim_heap

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TINYLLM_CONFIG = "tinyllm.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHA256 = r"^[0-9a-f]{64}$"


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ActMeta(_Entry):
    dtype: str
    granularity: str
    sym: StrictBool


class QuantMeta(_Entry):
    """One quantized layer in tinyllm.json."""

    shape: tuple[StrictInt, StrictInt]
    bits: StrictInt = Field(ge=1, le=8)
    group_size: StrictInt = Field(ge=-1)
    sym: StrictBool
    tied_to: str | None = None
    kind: Literal["embedding"] | None = None
    act: ActMeta | None = None
    kquant: Literal["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"] | None = None


class CheckpointInfo(_Entry):
    """The schema of tinyllm.json. Fields beyond these (steps, source, ...) are kept as given."""

    format: Literal[1]
    quantized: dict[str, QuantMeta] = {}
    sparse: dict[str, tuple[StrictInt, StrictInt]] = {}
    tied_embeddings: StrictBool = False
    digests: dict[str, str] | None = None  # weight file name -> sha256 hex
    steps: list[dict[str, Any]] = []


def read_info(path: Path) -> CheckpointInfo:
    """Parse `path/tinyllm.json`; every invalid field is named in the error."""
    file = Path(path) / TINYLLM_CONFIG
    try:
        text = file.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file} is unreadable: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        found = data.get("format") if isinstance(data, dict) else data
        raise ModelLoadError(
            f"{path}: unknown tinyllm format {found!r} (this tinyllm reads format "
            f"{FORMAT_VERSION}); load it with the tinyllm version that wrote it"
        )
    try:
        info = CheckpointInfo.model_validate_json(text)
    except ValidationError as exc:
        raise ModelLoadError(f"{file} is invalid: {_field_errors(exc)}") from exc
    for name, digest in (info.digests or {}).items():
        if not isinstance(digest, str) or len(digest) != 64 or "/" in name or name.startswith("."):
            raise ModelLoadError(f"{file} is invalid: digests.{name} is not a sha256 of a file")
    return info


def _field_errors(exc: ValidationError) -> str:
    """'field.path: message (got value)' for each error, joined with '; '."""
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"])
        got = repr(e.get("input"))[:60]
        parts.append(f"{loc}: {e['msg']} (got {got})")
    more = f"; and {exc.error_count() - 5} more" if exc.error_count() > 5 else ""
    return "; ".join(parts) + more


def prior_steps(spec: str | Path) -> list:
    """The steps recorded in a tinyllm directory (none for any other model spec)."""
    return read_info(Path(spec)).steps if (Path(spec) / TINYLLM_CONFIG).is_file() else []


def is_tinyllm_output(path: Path) -> bool:
    """A directory tinyllm wrote: a checkpoint (tinyllm.json) or anything `atomic_dir` completed
    (its `.tinyllm` marker: HF exports, distill checkpoints)."""
    path = Path(path)
    return (path / TINYLLM_CONFIG).is_file() or (path / OUTPUT_MARKER).is_file()


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to write over a non-empty path, and with `overwrite` refuse anything that is not
    a tinyllm output: replacing it would delete files tinyllm did not write."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not path.is_dir():
        raise ConfigError(f"output {path} is a file, not a directory; choose another path")
    if not overwrite:
        raise ConfigError(f"output {path} exists and is not empty; pass --overwrite to replace it")
    if not is_tinyllm_output(path):
        raise ConfigError(
            f"--overwrite refused: {path} is not empty and is not a tinyllm output (it has no "
            f"{TINYLLM_CONFIG} and no {OUTPUT_MARKER} marker), so replacing it would delete "
            "files tinyllm did not write; delete or move it yourself, or choose another output"
        )


def round_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Round the model's float parameters (embeddings, norms, head, unquantized linears) to `dtype`
    values in place, keeping float32 storage in memory, so a checkpoint that stores them as
    `dtype` reloads to exactly this model."""
    for p in model.parameters():
        if p.dtype == torch.float32:
            p.data = p.data.to(dtype).float()


def compact(t: torch.Tensor) -> torch.Tensor:
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


def checkpoint_tensors(
    model: nn.Module, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, tuple[int, int]]]:
    """What a checkpoint stores for the modules under `prefix` (the whole model: ""): tensors
    by key (QuantizedWeight records, sparse linears as bitmask + values, the rest compacted),
    tinyllm.json's quantized entries and the sparse layers. -> (tensors, quantized, sparse)"""
    root = model.get_submodule(prefix) if prefix else model
    dot = f"{prefix}." if prefix else ""
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict] = {}
    written: dict[int, str] = {}  # a record shared by a tied head is stored once
    for name, mod in root.named_modules(prefix=prefix):
        if not isinstance(mod, QuantLinear | QuantEmbedding | ActQuantLinear):
            continue
        if id(mod.qweight) in written:
            quantized[name] = {**mod.qweight.meta(), "tied_to": written[id(mod.qweight)]}
            continue
        if mod.qweight.packed.is_meta:
            raise ConfigError(
                f"{name}: this model was loaded for inference only (its packed codes live in "
                "the kernel's layout); load it again with tinyllm.load to save or export it"
            )
        written[id(mod.qweight)] = name
        tensors.update(mod.qweight.tensors(f"{name}.record"))
        quantized[name] = mod.qweight.meta()
        if isinstance(mod, QuantEmbedding):
            quantized[name]["kind"] = "embedding"
        if isinstance(mod, ActQuantLinear):  # the input's quantization (W8A8, FP8)
            quantized[name]["act"] = mod.act.meta()
            tensors.update(mod.act.tensors(f"{name}.act"))
    skip = _head_key(model) if not prefix and _tied(model) else None
    sparse = _sparse_linears(model, prefix)
    for key, value in root.state_dict(prefix=dot).items():
        if key == skip:
            continue
        if key in sparse:
            tensors.update(_sparse_tensors(key, value))
            continue
        tensors[key] = compact(value.detach().contiguous().clone())
    return tensors, quantized, sparse


def checkpoint_info(
    quantized: dict[str, dict], sparse: dict[str, tuple[int, int]], tied: bool, meta: dict
) -> dict[str, Any]:
    """tinyllm.json's content before the weight digests are added."""
    return {
        "format": FORMAT_VERSION,
        "quantized": quantized,
        "sparse": {k: list(v) for k, v in sparse.items()},
        "tied_embeddings": tied,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        **meta,
    }


def finish_checkpoint(
    tmp: Path, model: nn.Module, tokenizer: Any, info: dict, extra_files: dict | None
) -> None:
    """Config, tokenizer, report files and, last (it marks the directory complete), tinyllm.json
    with the sha256 of every weight file, into `tmp`, whose weight files are written."""
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for fname, data in (extra_files or {}).items():
        (tmp / fname).write_text(json.dumps(data, indent=2) + "\n")
    info["digests"] = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))}
    (tmp / TINYLLM_CONFIG).write_text(json.dumps(info, indent=2) + "\n")


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
    tensors, quantized, sparse = checkpoint_tensors(model)
    info = checkpoint_info(quantized, sparse, _tied(model), meta)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        finish_checkpoint(tmp, model, tokenizer, info, extra_files)
    return path


def shard_name(k: int, n: int) -> str:
    """Hugging Face's name of shard k (1-based) of n."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def weight_files(path: Path) -> list[Path]:
    """The checkpoint directory's weight files: model.safetensors, or the shards its index
    names (a streamed checkpoint); [] when there are none."""
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    try:
        shards = set(json.loads((path / INDEX).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    files = [path / name for name in sorted(shards) if isinstance(name, str)]
    return files if files and all(f.is_file() for f in files) else []


def write_index(tmp: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: which shard holds each tensor (Hugging Face's format)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _sparse_linears(model: nn.Module, prefix: str = "") -> dict[str, tuple[int, int]]:
    """State-dict keys of float block linears (under `prefix`) with enough exact zeros to store
    sparsely."""
    out = {}
    for s in analyze(model).linears:
        if prefix and not s.name.startswith(prefix + "."):
            continue
        if isinstance(s.module, nn.Linear):
            w = s.module.weight.detach()
            if float((w == 0).float().mean()) >= SPARSE_MIN:
                out[f"{s.name}.weight"] = tuple(w.shape)
    return out


def _sparse_tensors(key: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A bitmask of the nonzero positions (1 bit per weight) plus the kept values."""
    keep = (w != 0).reshape(-1)
    bits = torch.from_numpy(np.packbits(keep.numpy()))
    return {f"{key}.mask": bits, f"{key}.values": compact(w.detach().reshape(-1)[keep].clone())}


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


def load_checkpoint(
    path: Path,
    verify: bool = True,
    dtype: torch.dtype | None = torch.float32,
    inference: bool = False,
) -> tuple[nn.Module, Any]:
    """Rebuild the model from config, swap in QuantLinear records, load the float tensors in
    `dtype` (default float32), one weight file at a time: the model is built without weights
    (models.lazy.skeleton), so memory holds the result and one shard, never a float32 copy of
    the whole model. dtype None keeps large float tensors (embeddings, head) as stored, taking
    and giving float32 (models.lazy.compute_in_float32). `inference` frees each 4-bit layer's
    record once its kernel layout has the codes (kernels.qlinear.drop_records): such a model
    runs but cannot be saved.

    Before anything is allocated: tinyllm.json is validated, the weight files are checked
    against their recorded sha256 digests (unless `verify` is False), and the shapes config.json
    and tinyllm.json imply are compared with the stored ones."""
    path = Path(path)
    info, config, tokenizer = checked_parts(path, verify)
    model = skeleton(config)
    records: dict[str, QuantizedWeight] = {}
    for file in sorted(path.glob("*.safetensors")):
        fill_from_tensors(model, read_file(file), info, records, dtype)
        if inference:
            drop_records(model)  # shard by shard: the codes are never held twice
        trim_heap()
    _swap_records(model, {}, info["quantized"], records)  # heads sharing a later file's record
    if dtype is None:
        compute_in_float32(model)
    tied = bool(info.get("tied_embeddings"))
    if tied:
        model.tie_weights()
    missing = [k for k, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise ModelLoadError(
            f"{path}: checkpoint does not match its config (missing {missing[:2]})"
        )
    model.name_or_path = str(path)
    return model.eval(), tokenizer


# With dtype None, float tensors of at least this many elements keep their stored dtype.
LARGE_FLOAT = 1 << 22


def _float(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """t in `dtype`; with None, large tensors as stored and the rest in float32."""
    if dtype is None:
        return t if t.numel() >= LARGE_FLOAT else t.float()
    return t.to(dtype)


def fill_from_tensors(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    info: dict,
    records: dict[str, QuantizedWeight],
    dtype: torch.dtype | None = torch.float32,
) -> None:
    """Put the checkpoint tensors of one weight file (or one block) into the model: packed
    modules for the quantized layers whose records it holds, dense weights for its sparse
    layers, the float tensors in `dtype`. `records` collects the records swapped in so far
    (a tied head names one stored in another file)."""
    quantized = info["quantized"]
    _swap_records(model, tensors, quantized, records)
    state = {
        k: _float(v, dtype) if v.is_floating_point() else v
        for k, v in tensors.items()
        if ".record." not in k
        and not _is_act_tensor(k, quantized)
        and not k.endswith((".weight.mask", ".weight.values"))
    }
    for key, shape in info.get("sparse", {}).items():
        if f"{key}.mask" in tensors:
            state[key] = _float(_dense(tensors, key, shape), dtype)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ModelLoadError(f"checkpoint tensors the model does not have: {unexpected[:2]}")


class CheckpointWeights(LazyWeights):
    """A float tinyllm checkpoint's tensors, read on demand as a Hugging Face directory's are
    (streaming compression starts from it): a sparse layer, stored as bitmask + values, reads
    back dense (float32)."""

    def __init__(self, directory: Path, sparse: dict[str, list[int]]) -> None:
        super().__init__(directory)
        self.sparse = {key: (int(shape[0]), int(shape[1])) for key, shape in sparse.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.sparse or super().__contains__(name)

    def keys(self) -> list[str]:
        parts = {f"{k}.{leaf}" for k in self.sparse for leaf in ("mask", "values")}
        return [k for k in self.entries if k not in parts] + list(self.sparse)

    def numel(self, name: str) -> int:
        if name in self.sparse:
            return self.sparse[name][0] * self.sparse[name][1]
        return super().numel(name)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.sparse:
            return super().get(name, dtype)
        read = super().get  # (zero-argument super() does not work inside a comprehension)
        parts = {f"{name}.{leaf}": read(f"{name}.{leaf}") for leaf in ("mask", "values")}
        w = _dense(parts, name, list(self.sparse[name]))
        return w if dtype is None else w.to(dtype)


def open_lazy_checkpoint(path: Path, verify: bool = True) -> tuple[Any, Any, CheckpointWeights]:
    """A float tinyllm checkpoint to stream from: (config, tokenizer, weights), everything
    checked as `load_checkpoint` checks it; a quantized one is refused (its layers are packed
    records, not weights a step can start from)."""
    info, config, tokenizer = checked_parts(Path(path), verify)
    if info.get("quantized"):
        raise ConfigError(
            f"{path} is quantized: streaming starts from float (or pruned) weights; quantize "
            "the model it was made from, or use --stream off"
        )
    return config, tokenizer, CheckpointWeights(Path(path), info.get("sparse") or {})


def checked_parts(path: Path, verify: bool) -> tuple[dict, Any, Any]:
    """tinyllm.json (validated), config and tokenizer of a checkpoint, after checking digests,
    shapes and vocabulary against each other; no weight is allocated. -> (info, config, tok)"""
    meta = read_info(path)
    raw = read_config(path)
    shapes = check_safetensors_dir(path)
    if verify:
        verify_digests(path, meta)
    info = meta.model_dump(exclude_none=True)
    tokenizer = load_tokenizer(path)
    config = load_config(path)
    skeleton = meta_model(config)
    want, tied = expected_shapes(skeleton)
    check_shapes(path, raw, want, _stored_shapes(path, info, shapes), tied, strict_names=True)
    check_vocab(path, tokenizer, skeleton.get_input_embeddings().weight.shape[0])
    return info, config, tokenizer


def _swap_records(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    quantized: dict,
    records: dict[str, QuantizedWeight],
) -> None:
    """Replace each quantized layer named in `quantized` whose record `tensors` holds (or that
    shares one already in `records`) by its packed module."""
    for name, meta in sorted(quantized.items(), key=lambda kv: "tied_to" in kv[1]):
        owner = meta.get("tied_to")
        if name in records or (owner is not None and owner not in records):
            continue  # swapped in already, or shares a record not read yet
        if owner is not None:
            qw = records[name] = records[owner]
        elif f"{name}.record.packed" in tensors:
            qw = records[name] = QuantizedWeight.from_tensors(tensors, f"{name}.record", meta)
        else:
            continue  # its record is in another file
        if meta.get("kind") == "embedding":
            replace_embedding(model, name, qw)
        elif "act" in meta:
            act = ActivationQuant.from_tensors(tensors, f"{name}.act", meta["act"])
            replace_act_linear(model, name, qw, act)
        else:
            replace_linear(model, name, qw)


def verify_digests(path: Path, info: CheckpointInfo) -> None:
    """Each weight file must have the sha256 recorded when the checkpoint was written."""
    if info.digests is None:
        log.debug("%s records no weight digests (written before they were added)", path)
        return
    for file in sorted(Path(path).glob("*.safetensors")):
        if file.name not in info.digests:
            raise ModelLoadError(f"{path / TINYLLM_CONFIG}: digests has no entry for {file.name}")
    for name, expected in info.digests.items():
        file = path / name
        if not file.is_file():
            raise ModelLoadError(f"{file} is missing ({TINYLLM_CONFIG} records its digest)")
        found = sha256_file(file)
        if found != expected:
            raise ModelLoadError(
                f"{file} is not the file this checkpoint was written with: its sha256 is "
                f"{found}, {TINYLLM_CONFIG} expects {expected} (corrupted or changed on disk). "
                "Re-create the checkpoint, or load it anyway with --no-verify "
                "(Python: load(..., verify=False))"
            )


def _stored_shapes(path: Path, info: dict, shapes: dict[str, tuple]) -> dict[str, tuple]:
    """The model weight shapes a checkpoint holds: float tensors as stored, quantized and sparse
    layers as tinyllm.json describes them (their stored parts checked against that)."""
    quantized, sparse = info["quantized"], info["sparse"]
    out = {
        k: s
        for k, s in shapes.items()
        if ".record." not in k
        and not _is_act_tensor(k, quantized)
        and not k.endswith((".weight.mask", ".weight.values"))
    }
    for name, q in quantized.items():
        out[f"{name}.weight"] = tuple(q["shape"])
        if "tied_to" not in q:
            _check_record(path, name, q, shapes)
    for key, shape in sparse.items():
        out[key] = tuple(shape)
        mask = shapes.get(f"{key}.mask")
        if mask is None or mask != ((shape[0] * shape[1] + 7) // 8,):
            raise ModelLoadError(
                f"{path}: sparse layer {key} of shape {list(shape)} has a mask of "
                f"{list(mask) if mask else 'no'} bytes; the checkpoint is corrupted"
            )
    return out


def _check_record(path: Path, name: str, q: dict, shapes: dict[str, tuple]) -> None:
    """A quantized layer's packed codes must be as long as its recorded shape and bits imply."""
    rows, cols = q["shape"]
    need = (rows * cols * q["bits"] + 7) // 8
    packed = shapes.get(f"{name}.record.packed")
    if packed != (need,):
        raise ModelLoadError(
            f"{path}: quantized layer {name} ({rows}x{cols}, {q['bits']} bits) needs {need} "
            f"packed bytes, the file holds {list(packed) if packed else 'none'}; "
            f"{TINYLLM_CONFIG} and the weights do not match"
        )
    if q.get("kquant") is not None:
        _check_kquant(path, name, q, shapes)


def _check_kquant(path: Path, name: str, q: dict, shapes: dict[str, tuple]) -> None:
    """A K-quant record's super-block tensors must match its type and shape."""
    spec = kspec(q["kquant"])
    rows, cols = q["shape"]
    need = {"d": (rows, cols // SUPER), "sc": (rows, cols // spec.sub)}
    if not spec.signed:
        need |= {"dmin": need["d"], "mn": need["sc"]}
    fits = (q["bits"], q["group_size"]) == (spec.bits, spec.sub) and cols % SUPER == 0
    for key, shape in need.items():
        found = shapes.get(f"{name}.record.kq.{key}")
        if not fits or found != shape:
            raise ModelLoadError(
                f"{path}: {q['kquant']} layer {name} ({rows}x{cols}, {q['bits']} bits, group "
                f"{q['group_size']}) needs super-block tensor {key} of shape {list(shape)}, the "
                f"file holds {list(found) if found else 'none'}; the checkpoint is corrupted"
            )
