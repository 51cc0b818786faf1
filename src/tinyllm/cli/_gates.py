"""`--gate`, `--baseline` and `--junit`: regression gates on an evaluation (docs/gates.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tinyllm.cli._common import out
from tinyllm.errors import ConfigError
from tinyllm.eval.gates import (
    Gate,
    GateResult,
    check_gates,
    failed,
    fmt,
    load_baseline,
    parse_gates,
    require_baseline,
    summary,
    write_junit,
)

GateOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--gate",
        help="A limit the result must meet, repeatable: METRIC OP VALUE, e.g. 'kld<=0.1', "
        "'size<=90MB', 'latency<=20ms', 'task:analogy>=0.97x' (x: relative to --baseline). "
        "Metrics: ppl, ppl_ratio, kld, top1, size, bpw, tokens_per_second, latency, memory, "
        "energy, task:NAME. A failed gate, or a missing metric, exits 1 (docs/gates.md).",
    ),
]
BaselineOpt = Annotated[
    Path | None,
    typer.Option(
        "--baseline",
        help="An earlier result (`tinyllm eval --json`) that relative gates (VALUEx, "
        "ppl_ratio) compare against.",
    ),
]
JunitOpt = Annotated[
    Path | None,
    typer.Option(
        "--junit", help="Write the gate results as JUnit XML here (for CI), passed or not."
    ),
]


def prepare_gates(
    gates: list[str] | None, baseline: Path | None, junit: Path | None
) -> tuple[list[Gate], dict | None]:
    """The gates parsed and the baseline read, before any model loads: bad input fails fast."""
    parsed = parse_gates(gates or [])
    if junit is not None and not parsed:
        raise ConfigError("--junit writes the results of --gate: add at least one --gate")
    base = load_baseline(baseline) if baseline is not None else None
    require_baseline(parsed, base, "pass --baseline FILE (a result `tinyllm eval --json` wrote)")
    return parsed, base


def gate_table(results: list[GateResult]) -> Table:
    table = Table("gate", "value", "limit", "result", title="gates", title_justify="left")
    for r in results:
        table.add_row(
            r.gate,
            "-" if r.value is None else fmt(r.metric, r.value),
            "-" if r.limit is None else fmt(r.metric, r.limit),
            "[green]pass[/]" if r.passed else "[bold red]FAIL[/]",
        )
    return table


def enforce_gates(
    result: dict, gates: list[Gate], baseline: dict | None, junit: Path | None, suite: str
) -> None:
    """Check, print, write JUnit (either way); any failed gate is a GatesFailedError (exit 1)."""
    from tinyllm.eval.gates import GatesFailedError

    if not gates:
        return
    results = check_gates(result, gates, baseline)
    out.print(gate_table(results))
    for r in failed(results):
        out.print(f"[bold red]FAIL[/] {r.message}", highlight=False, soft_wrap=True)
    if junit is not None:
        write_junit(junit, suite, results)
        out.print(f"wrote {junit}")
    if failed(results):
        raise GatesFailedError(summary(results))
    out.print(summary(results))
