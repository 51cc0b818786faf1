"""Export a model tinyllm loads to the formats other runtimes read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tinyllm.errors import ConfigError
from tinyllm.util.fs import dir_size
from tinyllm.util.units import human_bytes

FORMATS = ("gguf", "onnx", "hf")  # gguf and onnx write a file, hf a directory
DEFAULT_TYPES = {"gguf": "f16", "onnx": "fp32"}


def check_output(path: Path, fmt: str, overwrite: bool) -> None:
    """Refuse a missing parent directory, the wrong kind of path, or an existing output without
    --overwrite."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if not path.parent.is_dir():
        raise ConfigError(f"directory {path.parent} does not exist; create it first")
    if fmt == "hf":
        from tinyllm.checkpoint import check_output_dir

        check_output_dir(path, overwrite)
        return
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file path")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it")


def check_options(fmt: str, qtype: str | None, embed_type: str | None = None) -> None:
    """Refuse an option the format does not read, rather than ignore it."""
    if fmt == "hf" and qtype is not None:
        raise ConfigError(
            f"an hf export takes no type (got '{qtype}'): the directory keeps each layer as it is, "
            "quantized layers packed and float layers float; drop the type"
        )
    if fmt != "gguf" and embed_type is not None:
        raise ConfigError(f"the embedding type applies to GGUF exports only; drop it for {fmt}")


def summary(path: Path, fmt: str, report: Any) -> str:
    """One line on what an export wrote: its size, and how many layers kept their integers."""
    path = Path(path)
    if fmt == "hf":
        return (
            f"wrote {path} ({human_bytes(dir_size(path))}): {len(report['packed'])} layers "
            f"packed, {len(report['dequantized'])} written as float"
        )
    if fmt == "onnx":
        size = path.stat().st_size + path.with_name(path.name + ".data").stat().st_size
        return (
            f"wrote {path} (+ .data, {human_bytes(size)}): {len(report.nbits)} layers as "
            f"MatMulNBits, {len(report.float_layers)} quantized layers as float"
        )
    return (
        f"wrote {path} ({human_bytes(path.stat().st_size)}): "
        f"{len(report.carried)} layers carried, {len(report.requantized)} re-quantized"
    )


def export(
    model: nn.Module,
    tokenizer: Any,
    path: Path,
    fmt: str = "gguf",
    qtype: str | None = None,
    overwrite: bool = False,
    strict: bool = False,
    **options: Any,
) -> Any:
    """Write `model` to `path` in `fmt`; the output appears only when complete. `options` go
    to the GGUF writer (`embed_type`); `summary(path, fmt, report)` describes the result."""
    check_output(path, fmt, overwrite)
    check_options(fmt, qtype, options.get("embed_type"))
    qtype = qtype or DEFAULT_TYPES.get(fmt)
    if fmt != "gguf" and any(getattr(m, "is_tinyllm_embedding", False) for m in model.modules()):
        raise ConfigError(
            f"{fmt} export of quantized embeddings is not supported; export GGUF (which carries "
            "them), or quantize without the embeddings step"
        )
    if fmt == "hf":
        from tinyllm.export.hf import export_hf

        return export_hf(model, tokenizer, path, strict=strict)
    if fmt == "onnx":
        from tinyllm.export.onnx import export_onnx

        return export_onnx(model, path, qtype, strict=strict)
    from tinyllm.export.gguf import export_gguf

    return export_gguf(model, tokenizer, path, qtype, strict=strict, **options)


STREAM_MODES = ("auto", "on", "off")


def streams(spec: str | Path, fmt: str, mode: str = "auto") -> bool:
    """Whether exporting `spec` reads it one block at a time (GGUF only): 'on', 'off', or 'auto'
    (when its float32 tensors would not be loaded whole for inference either: core.load.too_big)."""
    from tinyllm.core.load import too_big
    from tinyllm.models.load import resolve

    if mode not in STREAM_MODES:
        raise ConfigError(f"unknown --stream '{mode}'; choose one of {', '.join(STREAM_MODES)}")
    if mode == "off" or fmt != "gguf":
        if mode == "on":
            raise ConfigError(
                f"a streamed export writes GGUF only; {fmt} loads the model whole (--stream off)"
            )
        return False
    if mode == "on" and resolve(spec).kind == "gguf":
        raise ConfigError(f"{spec} is a GGUF file: it streams from a model directory only")
    return mode == "on" or too_big(spec)


def export_model(
    spec: str | Path,
    path: Path,
    fmt: str = "gguf",
    qtype: str | None = None,
    overwrite: bool = False,
    strict: bool = False,
    stream: str = "auto",
    **options: Any,
) -> Any:
    """Export the model `spec` names (`export` after `tinyllm.load`), or for GGUF read one
    decoder block at a time (`stream`: a model too big to load whole); the same file either way."""
    check_output(path, fmt, overwrite)
    check_options(fmt, qtype, options.get("embed_type"))
    if not streams(spec, fmt, stream):
        from tinyllm.core.load import load

        model, tokenizer = load(spec)
        return export(model, tokenizer, path, fmt, qtype, overwrite, strict, **options)
    from tinyllm.core.load import verify_default
    from tinyllm.core.stream import BlockReader
    from tinyllm.export.gguf import export_gguf
    from tinyllm.models.load import hf_directory, resolve

    r = resolve(spec)
    directory = r.path if r.kind == "tinyllm_dir" else hf_directory(spec)
    reader = BlockReader(directory, verify=verify_default())
    qtype = qtype or DEFAULT_TYPES[fmt]
    return export_gguf(
        reader.model, reader.tokenizer, path, qtype, strict=strict, reader=reader, **options
    )
