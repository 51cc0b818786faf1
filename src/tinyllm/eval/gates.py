"""Regression gates: limits on an evaluation result, checked in CI and in recipes (docs/gates.md).

A gate is `METRIC OP VALUE[unit|x]`, OP one of <=, <, >=, >:

    kld<=0.1              ppl<=1.05x             task:analogy>=0.97x
    size<=90MB            memory<2GiB            latency<=20ms        top1>=90%

METRIC names a number of an evaluation result (`EvalResult.to_dict()`, or its JSON from
`tinyllm eval --json`); a trailing `x` makes VALUE relative to the baseline's same metric. A
metric the result does not hold (KLD without a reference, a task that was not run, energy on a
host without counters) fails its gate with a message that says how to get it: a gate never
passes on a number it could not read.
"""

from __future__ import annotations

import json
import math
import operator
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tinyllm.errors import ConfigError, TinyLLMError
from tinyllm.util.fs import write_text_atomic
from tinyllm.util.units import human_bytes

SYNTAX = (
    "a gate is METRIC OP VALUE with OP one of <=, <, >=, > and METRIC one of "
    "ppl, ppl_ratio, kld, top1, size, bpw, tokens_per_second, latency, memory, energy or "
    "task:NAME; VALUE may carry a unit (size/memory: B, KB, MB, GB, KiB, MiB, GiB; latency: s, "
    "ms, us; energy: J, mJ; top1 and task accuracy: %) or end in x (relative to the baseline), "
    "e.g. kld<=0.1, ppl<=1.05x, size<=90MB, task:analogy>=0.97x"
)

OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}
BYTES = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
UNITS: dict[str, dict[str, float]] = {  # metric kind -> unit -> factor to the result's unit
    "bytes": BYTES,
    "seconds": {"s": 1.0, "ms": 1e-3, "us": 1e-6},
    "joules": {"j": 1.0, "mj": 1e-3},
    "fraction": {"%": 0.01},
}


@dataclass(frozen=True)
class Metric:
    """A gate metric: where its number is in a result, its unit and how to obtain it."""

    key: str  # the EvalResult field (for task:NAME: the task name is added)
    kind: str  # "bytes", "seconds", "joules", "fraction" or "number"
    missing: str  # what to do when the result lacks it


def _reference_hint(what: str) -> str:
    return (
        f"{what} compares against a reference model: run `tinyllm eval MODEL --reference "
        "ORIGINAL` (a recipe scores every stage against its original)"
    )


METRICS: dict[str, Metric] = {
    "ppl": Metric("perplexity", "number", "the result has no perplexity"),
    "ppl_ratio": Metric("perplexity", "number", "the result has no perplexity"),
    "kld": Metric("kld", "number", _reference_hint("KL divergence")),
    "top1": Metric("top1_agreement", "fraction", _reference_hint("top-1 agreement")),
    "size": Metric("size_bytes", "bytes", "the result has no size_bytes"),
    "bpw": Metric("bits_per_weight", "number", "the result has no bits_per_weight"),
    "tokens_per_second": Metric("tokens_per_second", "number", "the result has no speed"),
    "latency": Metric("latency", "seconds", "the result has no tokens_per_second"),
    "memory": Metric("peak_rss_bytes", "bytes", "the result has no peak_rss_bytes"),
    "energy": Metric(
        "joules_per_token",
        "joules",
        "energy per token is unavailable (it needs hardware counters: Linux powercap/RAPL "
        "readable by this user, or NVML on an NVIDIA GPU; see docs/energy.md)",
    ),
    "task": Metric(
        "tasks",
        "fraction",
        "run the task with `tinyllm eval MODEL --tasks NAME` (in a recipe: "
        "`evaluation: {tasks: ['NAME']}`)",
    ),
}
ALIASES = {
    "perplexity": "ppl",
    "top1_agreement": "top1",
    "size_bytes": "size",
    "bits_per_weight": "bpw",
    "peak_rss_bytes": "memory",
    "joules_per_token": "energy",
}

_GATE = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_]*(?::[^\s<>=]+)?)\s*(?P<op><=|>=|<|>)\s*"
    r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<unit>[A-Za-z%]*)\s*$"
)


class GateError(ConfigError):
    """A gate that cannot be read, or that cannot be checked as asked."""


class GatesFailedError(TinyLLMError):
    """A result missed at least one gate: the message lists each failed gate and why."""


@dataclass(frozen=True)
class Gate:
    """One parsed gate: `metric op value`, `value` in the result's unit (or a factor when
    `relative`)."""

    text: str
    metric: str  # "kld", "task:analogy", ...
    op: str
    value: float
    relative: bool = False

    @property
    def needs_baseline(self) -> bool:
        return self.relative or self.metric == "ppl_ratio"


@dataclass
class GateResult:
    """A gate checked against one result."""

    gate: str
    metric: str
    value: float | None  # the result's number (None: the result does not hold it)
    limit: float | None  # the limit it was held to (relative gates: factor x baseline)
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_gate(text: str) -> Gate:
    """'kld<=0.1' -> Gate; bad text is a GateError naming the gate and the syntax."""
    if not isinstance(text, str):
        raise GateError(f"gate {text!r} is not text; {SYNTAX}")
    m = _GATE.match(text)
    if m is None:
        raise GateError(f"cannot read gate {text!r}: {SYNTAX}")
    name = m["metric"].lower()
    base, _, task = name.partition(":")
    base = ALIASES.get(base, base)
    if base not in METRICS or (base == "task") != bool(task):
        raise GateError(f"gate {text!r}: unknown metric {m['metric']!r}; {SYNTAX}")
    metric = f"task:{m['metric'].partition(':')[2]}" if task else base
    value, relative = _value(text, base, float(m["value"]), m["unit"])
    if base == "ppl_ratio" and relative:
        raise GateError(f"gate {text!r}: ppl_ratio is already relative; write ppl_ratio<=1.05")
    return Gate(text.strip(), metric, m["op"], value, relative)


def _value(text: str, base: str, value: float, unit: str) -> tuple[float, bool]:
    """The gate's VALUE in the result's unit, and whether it is relative (a trailing x)."""
    if not math.isfinite(value):
        raise GateError(f"gate {text!r}: {value} is not a usable limit")
    unit = unit.lower()
    if unit == "x":
        return value, True
    if not unit:
        return value, False
    kind = METRICS[base].kind
    units = UNITS.get(kind, {})
    if unit not in units:
        accepted = ", ".join(units) if units else "none (a plain number)"
        raise GateError(
            f"gate {text!r}: unit {unit!r} does not fit {base}; units it takes: {accepted}, "
            "or x (relative to the baseline)"
        )
    return value * units[unit], False


def parse_gates(texts: Sequence[str | Gate]) -> list[Gate]:
    """Every gate parsed (Gates pass through)."""
    return [t if isinstance(t, Gate) else parse_gate(t) for t in texts]


def require_baseline(gates: Sequence[Gate], baseline: dict | None, how: str) -> None:
    """A relative gate (or ppl_ratio) without a baseline is a GateError that says `how` to give
    one."""
    if baseline is not None:
        return
    needy = [g.text for g in gates if g.needs_baseline]
    if needy:
        raise GateError(f"gate {needy[0]!r} is relative to a baseline, and none was given: {how}")


def metric_value(result: dict, metric: str) -> tuple[float | None, str]:
    """The number `metric` names in `result`, or (None, why it is missing and how to get it)."""
    base, _, task = metric.partition(":")
    spec = METRICS[base]
    if base == "task":
        entry = (result.get("tasks") or {}).get(task)
        value = entry.get("accuracy") if isinstance(entry, dict) else None
        why = f"task {task!r} was not run: " + spec.missing.replace("NAME", task)
    elif base == "latency":
        value = result.get("seconds_per_token")
        tps = result.get("tokens_per_second")
        if value is None and isinstance(tps, int | float) and tps > 0:
            value = 1.0 / tps
        why = spec.missing
    else:
        value = result.get(spec.key)
        why = f"{base}: {spec.missing}"
    if base == "energy" and value is None and result.get("energy_source"):
        why += f" (energy source: {result['energy_source']})"
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None, why
    return float(value), ""


def check_gate(gate: Gate, result: dict, baseline: dict | None = None) -> GateResult:
    """Check one gate; a number the result or the baseline lacks fails it, saying why."""
    require_baseline([gate], baseline, "give the baseline result")
    value, why = metric_value(result, gate.metric)
    if gate.metric == "ppl_ratio" and value is not None:
        ref, _ = metric_value(baseline or {}, "ppl")
        value, why = (value / ref, "") if ref else (None, "the baseline has no perplexity")
    if value is None:
        return GateResult(gate.text, gate.metric, None, None, False, f"missing: {why}")
    limit, note = gate.value, ""
    if gate.relative:
        ref, why = metric_value(baseline or {}, gate.metric)
        if ref is None:
            msg = f"the baseline lacks {gate.metric}, so a relative limit cannot be set: {why}"
            return GateResult(gate.text, gate.metric, value, None, False, msg)
        limit, note = gate.value * ref, f" ({gate.value:g}x baseline {fmt(gate.metric, ref)})"
    passed = OPS[gate.op](value, limit)
    op = gate.op if passed else _negated(gate.op)
    message = f"{gate.metric} {fmt(gate.metric, value)} {op} {fmt(gate.metric, limit)}{note}"
    if not passed:
        message += f": fails {gate.text}"
    return GateResult(gate.text, gate.metric, value, limit, passed, message)


def _negated(op: str) -> str:
    return {"<=": ">", "<": ">=", ">=": "<", ">": "<="}[op]


def fmt(metric: str, value: float) -> str:
    """A metric's number as people read it."""
    kind = METRICS[metric.partition(":")[0]].kind
    if kind == "bytes":
        return human_bytes(value)
    if kind == "seconds":
        return f"{value * 1e3:.3g} ms"
    if kind == "joules":
        return f"{value:.4g} J"
    return f"{value:.4g}"


def check_gates(
    result: dict, gates: Sequence[str | Gate], baseline: dict | None = None
) -> list[GateResult]:
    """Every gate checked against `result` (an EvalResult dict); relative gates and ppl_ratio
    against `baseline`, whose absence is a GateError."""
    parsed = parse_gates(gates)
    require_baseline(parsed, baseline, "pass a baseline result (tinyllm eval --baseline FILE)")
    return [check_gate(g, result, baseline) for g in parsed]


def failed(results: Sequence[GateResult]) -> list[GateResult]:
    return [r for r in results if not r.passed]


def summary(results: Sequence[GateResult]) -> str:
    """'2 of 3 gates failed: kld 0.2 > 0.1: fails kld<=0.1; ...' or 'all 3 gates passed'."""
    bad = failed(results)
    if not bad:
        return f"all {len(results)} gate{'s' if len(results) != 1 else ''} passed"
    return f"{len(bad)} of {len(results)} gates failed: " + "; ".join(r.message for r in bad)


# --- baselines ---------------------------------------------------------------------------------


def load_baseline(path: str | Path) -> dict:
    """An evaluation result JSON (`tinyllm eval --json`), checked; else a GateError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GateError(
            f"baseline {path} does not exist; write one with `tinyllm eval BASELINE_MODEL "
            "--json FILE`"
        ) from None
    except OSError as exc:
        raise GateError(f"cannot read baseline {path} ({exc.strerror})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise GateError(
            f"baseline {path} is not JSON ({exc}); give the file `tinyllm eval --json` wrote"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("perplexity"), int | float):
        raise GateError(
            f"baseline {path} is not an evaluation result (no 'perplexity' number); give the "
            "file `tinyllm eval --json` wrote"
        )
    return data


# --- JUnit XML ---------------------------------------------------------------------------------


def junit_xml(suites: dict[str, Sequence[GateResult]]) -> str:
    """JUnit XML with one <testsuite> per name and one <testcase> per gate; a failed gate is a
    <failure> with its message (what Jenkins, GitLab and GitHub test reporters read)."""
    root = ET.Element("testsuites", name="tinyllm gates")
    total = bad = 0
    for name, results in suites.items():
        suite = ET.SubElement(root, "testsuite", name=name, tests=str(len(results)))
        suite.set("failures", str(len(failed(results))))
        suite.set("errors", "0")
        suite.set("skipped", "0")
        suite.set("time", "0")
        for r in results:
            case = ET.SubElement(suite, "testcase", name=r.gate, classname=name, time="0")
            if r.passed:
                ET.SubElement(case, "system-out").text = r.message
            else:
                fail = ET.SubElement(case, "failure", message=r.message, type="GateFailed")
                fail.text = r.message
        total += len(results)
        bad += len(failed(results))
    root.set("tests", str(total))
    root.set("failures", str(bad))
    root.set("errors", "0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def write_junit(path: str | Path, suite_name: str, results: Sequence[GateResult]) -> None:
    """Write one suite of gate results as JUnit XML to `path`, atomically."""
    write_junit_suites(path, {suite_name: results})


def write_junit_suites(path: str | Path, suites: dict[str, Sequence[GateResult]]) -> None:
    """Write several suites (a recipe: one per stage) as JUnit XML to `path`, atomically."""
    write_text_atomic(Path(path), junit_xml(suites))
