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


def load(
    spec: str | Path = DEFAULT_MODEL, verify: bool | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object]:
    """Load a model (eval mode; its float tensors in `dtype`, default fp32: bfloat16 halves the
    memory of a model too large for it) and its tokenizer from any spec `models.load.resolve`
    accepts, tinyllm checkpoint directories included.

    `verify`: check a tinyllm checkpoint's weight files against the sha256 digests it recorded
    (default: on, unless the CLI was given --no-verify)."""
    r = resolve(spec)
    if r.kind == "tinyllm_dir":
        check = _verify_default if verify is None else verify
        return load_checkpoint(r.path, verify=check, dtype=dtype)
    return load_model(spec, dtype)
