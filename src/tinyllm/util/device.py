"""Which device a job computes on: `auto` (a GPU when one is present), `cpu`, `cuda` or `cuda:N`.

Every algorithm is written once, device-agnostic; this module only turns the user's spelling
into a `torch.device` and refuses what cannot work (a GPU asked for on a machine without one).
"""

from __future__ import annotations

import itertools
import re

import torch

from tinyllm.errors import ConfigError

DEVICE_HELP = "auto (a GPU when present, else cpu), cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def is_device_spec(spec: object) -> bool:
    """Whether `spec` is spelled as a device (auto, cpu, cuda, cuda:N), present or not."""
    return isinstance(spec, str) and bool(_PATTERN.match(spec.strip().lower()))


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda[:N]' checked against the GPUs present."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if not _PATTERN.match(spec):
        raise ConfigError(f"unknown device '{spec}'; use {DEVICE_HELP}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device '{spec}' asked for, but this machine has no usable GPU (torch "
                f"{torch.__version__}, CUDA {'built' if torch.version.cuda else 'not built'}); "
                "use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device '{spec}' asked for, but only {count} GPU(s) are present")
    return device


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are: its first parameter's or buffer's device (CPU if none)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")
