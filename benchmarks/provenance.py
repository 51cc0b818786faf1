"""Where a measurement came from: the commit, whether the tree had uncommitted changes, the date
and the CPU. Every benchmark stamps its rows with it, so BENCHMARKS.md can name the commit of
each number (`benchmarks/make_page.py`)."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def cpu_name() -> str:
    """The CPU's model name and its widest vector extension (avx512 / avx2 / none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if "model name" in ln), "")
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    vec = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    return f"{name or 'unknown'} ({vec})"


def provenance() -> dict[str, str | bool]:
    """{commit, dirty, date, cpu} of the run being recorded."""
    return {
        "commit": _git("rev-parse", "--short=7", "HEAD") or "unknown",
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "src")),
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
    }


def write_result(out: Path, result: dict) -> None:
    """Stamp `result` with its provenance, write it to `out` as JSON and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result["provenance"] = provenance()
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
