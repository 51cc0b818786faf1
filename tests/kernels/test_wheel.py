"""The wheel ships what tinyllm reads at run time, and an installed copy uses its C++ kernel.

Builds the wheel from a copy of the checkout, installs it (no dependencies) into a fresh virtual
environment whose only way to torch and friends is a `.pth` line to this environment's
site-packages (that line adds the directory alone: the editable install's own `.pth` there is not
processed, so `src/` stays out of reach), and runs a script in it. The kernel builds from the
installed sources into a directory under tmp_path (TINYLLM_KERNEL_DIR), never the dev build's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
from pathlib import Path
import torch
import tinyllm
from tinyllm.kernels import native
from tinyllm.kernels.layouts import Q4Native
from tinyllm.kernels.qlinear import QuantLinear
from tinyllm.quant.rtn import RTN, rtn_quantize

torch.manual_seed(0)
qw = rtn_quantize(torch.randn(96, 256), RTN(bits=4, group_size=64))
layer = QuantLinear(qw)
x = torch.randn(3, 256)
err = (layer(x) - x @ qw.dequantize().t()).abs().max().item()
kernel = native.q4_kernel()
pkg = Path(tinyllm.__file__).parent
print(json.dumps({
    "tinyllm": tinyllm.__file__,
    "csrc": sorted(p.name for p in (pkg / "kernels" / "csrc").glob("*.cpp")),
    "sources": [str(s) for s in native.SOURCES],
    "recipes": sorted(p.name for p in (pkg / "recipes").glob("*.yaml")),
    "reason": native.unavailable_reason(),
    "extension": None if kernel is None else kernel.__file__,
    "kernel": layer.kernel,
    "q4_layout": isinstance(layer.layout, Q4Native),
    "max_err": err,
}))
"""


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def _build_wheel(tmp: Path) -> Path:
    """A wheel built offline from a copy of the checkout (no build/ or egg-info left in it)."""
    src = tmp / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "src", src / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(src)])
    (wheel,) = tmp.glob("tinyllm-*.whl")
    return wheel


def _fresh_venv(tmp: Path) -> Path:
    """A new virtual environment that sees this one's packages through a plain `.pth` line."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    deps = sysconfig.get_path("purelib")  # this environment's site-packages: torch, transformers
    (Path(site.stdout.strip()) / "tinyllm_test_deps.pth").write_text(deps + "\n")
    return python


@pytest.mark.slow
def test_the_installed_wheel_ships_its_sources_and_uses_the_native_kernel(tmp_path: Path) -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler '{cxx}' on PATH: the native kernel cannot be built here")
    wheel = _build_wheel(tmp_path)
    python = _fresh_venv(tmp_path)
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    _run([*pip, "install", "--no-deps", "--no-index", "-q", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TINYLLM_KERNEL_DIR"] = str(tmp_path / "kernels")
    out = _run([str(python), "-c", SCRIPT], cwd=tmp_path, env=env, timeout=900)
    got = json.loads(out.stdout.strip().splitlines()[-1])

    venv = (tmp_path / "venv").resolve()
    assert Path(got["tinyllm"]).resolve().is_relative_to(venv), got["tinyllm"]
    assert got["csrc"] == ["q4gemv.cpp", "runtime_ops.cpp"]
    assert all(Path(s).resolve().is_relative_to(venv) for s in got["sources"])
    assert got["recipes"] == sorted(p.name for p in (ROOT / "src/tinyllm/recipes").glob("*.yaml"))
    assert got["reason"] is None
    assert got["extension"] is not None, f"the kernel did not build:\n{out.stderr}"
    assert Path(got["extension"]).resolve().is_relative_to(tmp_path.resolve() / "kernels")
    assert got["kernel"] == "q4" and got["q4_layout"]
    assert got["max_err"] < 1e-3
