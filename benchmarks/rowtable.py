"""The row loop every table benchmark shares: results merged into one JSON file row by row, so an
interrupted run resumes; finished rows are skipped unless --force; --table only prints."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from provenance import provenance


def row_args(rows: list[str], ap: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    ap = ap or argparse.ArgumentParser()
    ap.add_argument("--rows", default=",".join(rows), help="comma-separated rows to run")
    ap.add_argument("--force", action="store_true", help="re-run rows that have results")
    ap.add_argument("--table", action="store_true", help="only print the Markdown table")
    return ap.parse_args()


def run_rows(
    out: Path,
    args: argparse.Namespace,
    run_row: Callable[[str], dict],
    table: Callable[[dict], str],
) -> None:
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.table:
        print(table(results))
        return
    for name in args.rows.split(","):
        if name in results and not args.force:
            continue
        print(f"== {name}", flush=True)
        row = {**run_row(name), "provenance": provenance()}
        if out.exists():  # rows another run of the same benchmark wrote meanwhile are kept
            results = json.loads(out.read_text())
        results[name] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")  # atomic: a crash never leaves half a results file
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(out)
    print(table(results))


def rows_present(results: dict, rows: list[str]) -> Iterator[tuple[str, dict]]:
    """(name, results) of each row in `rows` that has results, in the table's order."""
    for name in rows:
        if name in results:
            yield name, results[name]


def table_head(columns: str) -> list[str]:
    """The header and separator lines of a Markdown table; `columns` as "a | b | c"."""
    return [f"| {columns} |", "|" + "---|" * (columns.count("|") + 1)]


def cli_eval(target: str, reference: str = "smollm2-135m") -> dict:
    """`tinyllm eval TARGET --reference REFERENCE --json` in a fresh process; its result."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "tinyllm.cli", "eval", target, "--reference", reference]
        subprocess.run([*cmd, "--json", str(res)], check=True)
        return json.loads(res.read_text())
