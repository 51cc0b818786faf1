"""tinyllm's own CPU kernels (C++), compiled on first use with torch's extension builder.

The 4-bit decode GEMV (csrc/q4gemv.cpp) keeps weights as 4-bit codes and reads 16 output rows
per vector lane group, so a decode step moves an eighth of the bytes of a float32 matmul. The
build (about a minute, once per machine and source version; cached in $TINYLLM_KERNEL_DIR,
default ~/.cache/tinyllm/kernels, shared by every TINYLLM_CACHE, in a directory named by the
machine, the torch version and a digest of the sources) needs a C++
compiler. The sources ship inside the package (tinyllm/kernels/csrc, package data of the wheel)
and are read from wherever tinyllm is installed. Where they are missing, no compiler is found or
the build fails, `q4_kernel()` returns None, logs one warning saying why, and the layouts fall
back to PyTorch's kernels (kernels/layouts.py): same results, slower decode.

`TINYLLM_KERNEL_ISA` picks the vector path: `native` (default: what this CPU has; AVX-512 where
present), `avx2` (AVX-512 disabled: the AVX2 + FMA + F16C paths every x86 laptop has) or `scalar`
(no AVX at all: the plain C++ loops). Each builds into its own directory, so the three can be
compared on one machine (tests/kernels, benchmarks/bench_decode.py).

Builds are serialized by an OS file lock (`flock`), which the kernel releases when its holder
dies. torch's own build lock is a plain file that a process killed mid-build leaves behind, and
every later process then waits on it forever; under our lock no other build is running, so such
a file is stale and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
LANES = 16
CSRC = Path(str(resources.files("tinyllm.kernels") / "csrc"))
SOURCES = [CSRC / name for name in ("q4gemv.cpp", "runtime_ops.cpp")]
FALLBACK = "using PyTorch's kernels instead (same results, slower decode)"


def unavailable_reason() -> str | None:
    """Why the C++ kernels cannot be built here before trying, or None if they may be."""
    missing = [str(s) for s in SOURCES if not s.is_file()]
    if missing:
        return (
            f"C++ sources missing from the installed package ({', '.join(missing)}); "
            "reinstall tinyllm from a wheel or checkout that includes tinyllm/kernels/csrc"
        )
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler '{cxx}' on PATH (install g++ or set CXX)"
    return None


@functools.cache
def q4_kernel() -> Any | None:
    """The compiled extension, or None (with one warning saying why) if it cannot be built."""
    reason = unavailable_reason()
    if reason is not None:
        log.warning("tinyllm's C++ kernels are unavailable: %s; %s", reason, FALLBACK)
        return None
    return _build()


# TINYLLM_KERNEL_ISA -> the compiler flags that pick the kernels' vector path
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "scalar": ["-mno-avx"]}


def kernel_isa() -> str:
    """The vector path asked for (TINYLLM_KERNEL_ISA: native, avx2 or scalar)."""
    isa = os.environ.get("TINYLLM_KERNEL_ISA", "native").strip().lower() or "native"
    if isa not in ISA_FLAGS:
        from tinyllm.errors import ConfigError

        raise ConfigError(f"TINYLLM_KERNEL_ISA must be one of {', '.join(ISA_FLAGS)}, got {isa!r}")
    return isa


def _build() -> Any | None:
    from torch.utils import cpp_extension

    isa = kernel_isa()
    build = _build_dir(f"{_build_tag()}-{isa}")
    try:
        with build_lock(build):
            return cpp_extension.load(
                name=f"tinyllm_q4gemv_{isa}",
                sources=[str(s) for s in SOURCES],
                extra_cflags=["-O3", "-march=native", *ISA_FLAGS[isa], "-ffast-math", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                verbose=False,
            )
    except Exception as exc:  # no headers, a compiler error: fall back, once, loudly
        log.warning("tinyllm's C++ kernels failed to build in %s (%s); %s", build, exc, FALLBACK)
        return None


@contextlib.contextmanager
def build_lock(build: Path) -> Any:
    """Hold an exclusive flock on the build directory; drop torch's baton file if one is left
    from a build whose process died (no live build can hold it while we hold the flock)."""
    with open(build / ".tinyllm-build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        baton = build / "lock"
        if baton.exists():
            log.warning("removing %s left by a kernel build that did not finish", baton)
            baton.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_tag() -> str:
    """Machine, torch version and a digest of the sources (their paths and bytes): two checkouts
    or versions never share, and so never rebuild over, one build directory."""
    digest = hashlib.sha256()
    for src in SOURCES:
        digest.update(str(src.resolve()).encode() + b"\0" + src.read_bytes())
    return (
        f"{platform.machine()}-torch{torch.__version__.replace('+', '_')}-{digest.hexdigest()[:12]}"
    )


def _build_dir(tag: str) -> Path:
    root = os.environ.get("TINYLLM_KERNEL_DIR", Path.home() / ".cache" / "tinyllm" / "kernels")
    path = Path(root).expanduser() / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def repack_q4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """codes uint8 [N, K], scale/zero [N, G] -> interleaved codes [N/16, K/2, 16] (low nibble:
    column 2j, high: 2j+1) and scale/zero float16 [N/16, G, 16] (exact: records hold fp16
    scales and integer zero points; other scales are rounded to fp16)."""
    n, k = codes.shape
    pairs = codes.reshape(n, k // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)  # [N, K/2]
    packed = packed.reshape(n // LANES, LANES, k // 2).transpose(1, 2).contiguous()

    def lanes(t: torch.Tensor) -> torch.Tensor:
        return t.half().reshape(n // LANES, LANES, -1).transpose(1, 2).contiguous()

    return packed, lanes(scale), lanes(zero)


def repack_q8(codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [N, K], per-row scale [N] -> codes [N/16, K, 16] and scale float32 [N/16, 16]."""
    n, k = codes.shape
    packed = codes.reshape(n // LANES, LANES, k).transpose(1, 2).contiguous()
    return packed, scale.float().reshape(n // LANES, LANES).contiguous()
