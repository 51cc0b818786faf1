"""`tinyllm plan` refuses plans that would not fit memory (core.estimate)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllm.errors import ConfigError
from tinyllm.pipeline.planner import check_memory


def test_a_plan_that_fits_gets_both_estimates(tiny_dir: Path) -> None:
    compress, serve = check_memory(str(tiny_dir), 16, 64)
    assert (compress.job, compress.method) == ("compress", "gptq")
    assert serve.job == "generate" and serve.peak_bytes > 0


def test_a_too_small_budget_is_refused_with_the_numbers(tiny_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"compress job \(gptq\) needs about .* but 1\.0 MiB"):
        check_memory(str(tiny_dir), 16, 64, max_memory="1MiB")
    with pytest.raises(ConfigError, match="--max-memory 'lots' is not a size"):
        check_memory(str(tiny_dir), 16, 64, max_memory="lots")


def test_cli_plan_refuses_before_loading(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan"
    env = {**os.environ, "COLUMNS": "200"}
    args = ["plan", str(tiny_dir), "--max-size", "0.5x", "--max-memory", "1MB", "-o", str(out)]
    p = subprocess.run(
        [sys.executable, "-m", "tinyllm.cli", *args], capture_output=True, text=True, env=env
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "of host memory but" in p.stderr and "tinyllm estimate" in p.stderr
    assert not out.exists()
