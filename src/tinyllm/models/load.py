"""`load(spec)`: a registered name, a Hugging Face directory, a .gguf file, or a tinyllm directory.

Every spec ends as a plain safetensors checkpoint that transformers reads. GGUF files (registered
names resolve to one) are dequantized through transformers once and cached under
`$TINYLLM_CACHE/models/`, so later loads read safetensors only.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tinyllm.errors import ModelLoadError, ModelNotFoundError
from tinyllm.models import registry
from tinyllm.models.validate import (
    check_shapes,
    check_tokenizer_files,
    check_vocab,
    expected_shapes,
    meta_model,
    read_config,
    read_header,
    safetensors_shapes,
)
from tinyllm.util.fs import atomic_dir, cache_dir, file_fingerprint, recover_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "tinyllm-source.json"  # written beside a converted checkpoint
TINYLLM_CONFIG = "tinyllm.json"  # marks a tinyllm output directory


@dataclass(frozen=True)
class Resolved:
    """What a spec names: `kind` is one of registered, hf_dir, gguf, tinyllm_dir."""

    kind: str
    path: Path
    name: str


def resolve(spec: str | Path) -> Resolved:
    """Work out what a model spec names, without loading anything heavy."""
    text = str(spec)
    if text in registry.REGISTRY:
        return Resolved("registered", Path(), text)
    path = Path(text).expanduser()
    if not path.exists():
        _recover(path)
    if not path.exists():
        known = ", ".join(registry.REGISTRY)
        raise ModelNotFoundError(
            f"'{text}' is not a registered model ({known}) and no such file or directory exists"
        )
    if path.is_dir():
        if (path / TINYLLM_CONFIG).is_file():
            return Resolved("tinyllm_dir", path, path.name)
        if (path / "config.json").is_file():
            return Resolved("hf_dir", path, path.name)
        raise ModelLoadError(
            f"{path} is a directory with no model in it (no config.json, no {TINYLLM_CONFIG})"
        )
    if _is_gguf(path):
        return Resolved("gguf", path, path.stem)
    raise ModelLoadError(
        f"{path} is not a model file: expected a .gguf file, a Hugging Face model directory, "
        "a tinyllm output directory or a registered name"
    )


def _recover(path: Path) -> None:
    """Put back a directory whose replacement a crash interrupted (see util.fs.atomic_dir)."""
    try:
        recover_dir(path)  # logs a warning when it puts the old version back
    except OSError as exc:  # an unreadable parent: the not-found error below says enough
        log.debug("cannot check %s for an interrupted replacement: %s", path, exc)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def load(
    spec: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object]:
    """Load a model (`dtype`, default fp32; eval mode) and its tokenizer from a registered name,
    a Hugging Face directory or a GGUF file. A tinyllm checkpoint directory needs the packed
    layers of a layer above this one: `tinyllm.load` (`tinyllm.core.load.load`) reads those."""
    return load_hf_dir(hf_directory(spec), dtype)


def hf_directory(spec: str | Path) -> Path:
    """The Hugging Face directory a spec stands for (a registered name or a GGUF file is
    converted once into the cache); a tinyllm checkpoint is refused."""
    r = resolve(spec)
    if r.kind == "registered":
        gguf = registry.gguf_path(registry.REGISTRY[r.name])
        return _converted_gguf(gguf, cache_name=r.name)
    if r.kind == "gguf":
        return _converted_gguf(r.path, cache_name=f"{r.path.stem}-{file_fingerprint(r.path)}")
    if r.kind == "tinyllm_dir":
        raise ModelLoadError(
            f"{r.path} is a tinyllm checkpoint; load it with tinyllm.load (tinyllm.core.load.load)"
        )
    return r.path


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def checked_hf_dir(directory: Path) -> tuple[object, object]:
    """config.json (sizes, no custom code), the safetensors headers, the shapes the config
    implies against the stored ones, and the tokenizer, all checked before any weight is
    read. -> (config, tokenizer)"""
    _quiet_transformers()
    raw = read_config(directory)
    shapes = check_safetensors_dir(directory)
    tokenizer = load_tokenizer(directory)
    config = load_config(directory)
    skeleton = meta_model(config)
    want, tied = expected_shapes(skeleton)
    check_shapes(directory, raw, want, shapes, tied, skeleton.base_model_prefix)
    check_vocab(directory, tokenizer, skeleton.get_input_embeddings().weight.shape[0])
    return config, tokenizer


def load_hf_dir(directory: Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Load a Hugging Face checkpoint directory (safetensors weights only).

    Everything is checked before any weight is allocated: config.json (sizes, no custom code),
    the safetensors headers, the shapes the config implies against the stored ones, and the
    tokenizer."""
    from transformers import AutoModelForCausalLM

    config, tokenizer = checked_hf_dir(directory)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            directory,
            config=config,
            dtype=dtype,
            use_safetensors=True,
            output_loading_info=True,
            trust_remote_code=False,
        )
    except Exception as exc:  # transformers raises many types for a bad checkpoint
        raise ModelLoadError(f"cannot load the model in {directory}: {_one_line(exc)}") from exc
    missing = [k for k in info.get("missing_keys", []) if not _is_tied(model, k)]
    if missing:
        raise ModelLoadError(
            f"{directory}: checkpoint lacks {len(missing)} weights (first: {missing[0]}); "
            "it is incomplete or belongs to another architecture"
        )
    own_memory(model)
    return model.eval(), tokenizer


def own_memory(model: nn.Module) -> None:
    """Copy parameters and buffers out of the memory-mapped safetensors file. from_pretrained
    leaves them as views of one file mapping, whose pages stay resident (and count in RSS) until
    the last tensor from the file is gone: every weight a compression step replaces would keep
    its file pages while its replacement takes new memory (GPTQ's peak RSS grew ~18 MB per
    block). Copies are freed as soon as they are replaced, and the mapping goes once all are."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()


def load_tokenizer(directory: Path) -> object:
    """The directory's tokenizer; never runs code shipped with it."""
    from transformers import AutoTokenizer

    check_tokenizer_files(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load a tokenizer from {directory}: {_one_line(exc)}; copy the tokenizer "
            "files of the model it was made from into it"
        ) from exc
    if isinstance(tokenizer, bool) or not hasattr(tokenizer, "encode"):
        raise ModelLoadError(f"{directory}: its tokenizer files hold no usable tokenizer")
    return tokenizer


def load_config(directory: Path) -> object:
    """transformers' config object for a directory `read_config` accepted."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"{directory}/config.json is not valid: {_one_line(exc)}") from exc


def _is_tied(model: nn.Module, key: str) -> bool:
    return key.endswith("lm_head.weight") and bool(
        getattr(model.config, "tie_word_embeddings", False)
    )


def check_safetensors_dir(directory: Path) -> dict[str, tuple[int, ...]]:
    """Refuse directories without safetensors weights, and truncated or corrupted files.

    -> the stored tensors' shapes (from the headers; nothing is read or allocated)"""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        other = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = f" (found {other[0]}: tinyllm loads safetensors only)" if other else ""
        raise ModelLoadError(f"{directory} has config.json but no *.safetensors weights{hint}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
            header_end = _safetensors_data_end(f)
        except Exception as exc:
            raise ModelLoadError(
                f"{f} is not a readable safetensors file: {_one_line(exc)}"
            ) from exc
        if f.stat().st_size < header_end:
            raise ModelLoadError(f"{f} is truncated ({f.stat().st_size} of {header_end} bytes)")
    return safetensors_shapes(files)


def _safetensors_data_end(path: Path) -> int:
    """Bytes the header says the file has: 8 + header length + largest tensor end offset."""
    header = read_header(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def _check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table; a truncated or corrupted file fails here."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        for t in reader.tensors:
            _ = t.data.shape
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is not a readable GGUF file (truncated or corrupted?): {_one_line(exc)}"
        ) from exc


def _converted_gguf(gguf: Path, cache_name: str) -> Path:
    """Dequantize a GGUF through transformers into a cached plain safetensors checkpoint."""
    target = cache_dir("models") / cache_name
    if (target / SOURCE_FILE).is_file():
        return target
    _check_gguf(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    log.warning("converting %s to safetensors in %s (once; later loads are fast)", gguf, target)
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:
        raise ModelLoadError(f"transformers cannot read {gguf}: {_one_line(exc)}") from exc
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF grid is gone once dequantized
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf), "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    return target


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
