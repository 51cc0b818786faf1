"""`load`: any model spec, including a tinyllm checkpoint directory (what `tinyllm.load` is).

`models.load` (layer 2) handles registered names, Hugging Face directories and GGUF files; a
tinyllm checkpoint needs the packed layouts of `tinyllm.kernels` (layer 3), so the dispatch that
adds it lives here, above both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tinyllm.checkpoint import load_checkpoint
from tinyllm.models.load import DEFAULT_MODEL, resolve
from tinyllm.models.load import load as load_model

_verify_default = True  # the CLI's --no-verify turns it off for the whole command


def set_verify_default(verify: bool) -> None:
    """Whether `load` checks checkpoint digests when its caller does not say (CLI --no-verify)."""
    global _verify_default
    _verify_default = verify


def verify_default() -> bool:
    """Whether checkpoint digests are checked when a caller does not say."""
    return _verify_default


def load(
    spec: str | Path = DEFAULT_MODEL,
    verify: bool | None = None,
    dtype: torch.dtype = torch.float32,
    inference: bool = False,
) -> tuple[nn.Module, object]:
    """Load a model (eval mode; its float tensors in `dtype`, default fp32) and its tokenizer
    from any spec `models.load.resolve` accepts, tinyllm checkpoint directories included.

    `inference` (generate, serve: the model is never saved): a 4-bit checkpoint holds its codes
    once (in the kernel's layout), and a model whose float32 tensors would take more than
    NARROW_SHARE of the memory available or NARROW_BYTES keeps them narrow: a tinyllm
    checkpoint its large tables (embeddings, head) as stored, computing in float32 around
    them; a Hugging Face model everything in bfloat16.

    `verify`: check a tinyllm checkpoint's weight files against the sha256 digests it recorded
    (default: on, unless the CLI was given --no-verify)."""
    r = resolve(spec)
    narrow = inference and too_big(spec)
    if r.kind == "tinyllm_dir":
        check = _verify_default if verify is None else verify
        chosen = None if narrow else dtype
        return load_checkpoint(r.path, verify=check, dtype=chosen, inference=inference)
    return load_model(spec, torch.bfloat16 if narrow else dtype)


# inference loads narrow a model whose float32 tensors exceed this share of available memory,
# or NARROW_BYTES (the tables of an 8B model: 4.2 GB in float32, 2.1 as stored)
NARROW_SHARE = 0.5
NARROW_BYTES = 2 << 30


def too_big(spec: str | Path) -> bool:
    """Whether the model's float32 tensors exceed NARROW_SHARE of the memory available or
    NARROW_BYTES: what `load(..., inference=True)` keeps narrow."""
    from tinyllm.models.lazy import float32_bytes
    from tinyllm.models.load import hf_directory
    from tinyllm.util.memory import available_bytes

    r = resolve(spec)
    directory = r.path if r.kind == "tinyllm_dir" else hf_directory(spec)
    return float32_bytes(directory) > min(NARROW_SHARE * available_bytes(), NARROW_BYTES)
