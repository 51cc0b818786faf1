"""Export a model tinyllm loads to the formats other runtimes read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tinyllm.errors import ConfigError

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
    """Write `model` to `path` in `fmt`; the output appears only when complete."""
    check_output(path, fmt, overwrite)
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
