"""BENCHMARKS.md's headline tables are generated from benchmarks/results/*.json and must match."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import make_page  # noqa: E402


def test_the_headline_tables_match_the_results_files():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "make_page.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_changed_result_makes_the_page_stale(tmp_path, monkeypatch):
    """Copy the results, change one number: the regenerated part differs in exactly that row."""
    results = tmp_path / "results"
    results.mkdir()
    for f in (ROOT / "benchmarks" / "results").glob("*.json"):
        (results / f.name).write_bytes(f.read_bytes())
    data = json.loads((results / "eval_smollm2.json").read_text())
    data["perplexity"] = 99.0
    (results / "eval_smollm2.json").write_text(json.dumps(data))
    page = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    monkeypatch.setattr(make_page, "HERE", tmp_path)
    new = make_page.updated(page)
    changed = [b for a, b in zip(page.splitlines(), new.splitlines(), strict=True) if a != b]
    assert len(changed) == 1, changed
    assert changed[0].startswith("| perplexity, FP32")
    assert "| **99.000** |" in changed[0] and "| **missed** |" in changed[0]


def test_every_headline_row_carries_a_commit():
    page = make_page.headline()
    rows = [ln for ln in page.splitlines() if ln.startswith("| ") and "---" not in ln]
    rows = [r for r in rows if not r.startswith("| measure")]
    assert len(rows) >= 15
    assert all("unknown" not in r.rsplit("|", 2)[1] for r in rows), rows
