"""Export a model tinyllm loads to the formats other runtimes read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tinyllm.errors import ConfigError

FORMATS = ("gguf",)


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse a missing parent directory, a directory, or an existing file without overwrite."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"directory {path.parent} does not exist; create it first")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file path")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it")


def export(
    model: nn.Module,
    tokenizer: Any,
    path: Path,
    fmt: str = "gguf",
    qtype: str = "f16",
    overwrite: bool = False,
    strict: bool = False,
    **options: Any,
) -> Any:
    """Write `model` to `path` in `fmt`; the file appears only when complete."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    check_output_file(path, overwrite)
    from tinyllm.export.gguf import export_gguf

    return export_gguf(model, tokenizer, path, qtype, strict=strict, **options)
