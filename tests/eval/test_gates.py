"""Regression gates: parsing, units, relative limits, missing metrics, JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from tinyllm.errors import TinyLLMError
from tinyllm.eval.gates import (
    GateError,
    check_gates,
    load_baseline,
    parse_gate,
    summary,
    write_junit,
    write_junit_suites,
)

RESULT = {
    "perplexity": 20.0,
    "kld": 0.05,
    "top1_agreement": 0.91,
    "size_bytes": 50_000_000,
    "bits_per_weight": 4.25,
    "tokens_per_second": 200.0,
    "peak_rss_bytes": 3 * 2**30,
    "tasks": {"analogy": {"accuracy": 0.40, "stderr": 0.03, "n": 280}},
}
BASELINE = {
    "perplexity": 19.0,
    "kld": None,
    "size_bytes": 200_000_000,
    "tasks": {"analogy": {"accuracy": 0.42, "stderr": 0.03, "n": 280}},
}


@pytest.mark.parametrize(
    ("text", "metric", "op", "value", "relative"),
    [
        ("kld<=0.1", "kld", "<=", 0.1, False),
        (" ppl <= 1.05x ", "ppl", "<=", 1.05, True),
        ("size<=90MB", "size", "<=", 90e6, False),
        ("size<85MiB", "size", "<", 85 * 2**20, False),
        ("memory<2GiB", "memory", "<", 2 * 2**30, False),
        ("latency<=20ms", "latency", "<=", 0.02, False),
        ("energy<=5mJ", "energy", "<=", 0.005, False),
        ("top1>=90%", "top1", ">=", 0.9, False),
        ("task:analogy>=0.97x", "task:analogy", ">=", 0.97, True),
        ("task:wiki_next>.5", "task:wiki_next", ">", 0.5, False),
        ("perplexity<30", "ppl", "<", 30.0, False),  # the result's field names work too
        ("bits_per_weight<=4.5", "bpw", "<=", 4.5, False),
        ("tokens_per_second>=1e2", "tokens_per_second", ">=", 100.0, False),
    ],
)
def test_parse(text: str, metric: str, op: str, value: float, relative: bool) -> None:
    g = parse_gate(text)
    assert (g.metric, g.op, g.relative) == (metric, op, relative)
    assert g.value == pytest.approx(value)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("kld=0.1", "cannot read gate"),
        ("kld<=", "cannot read gate"),
        ("kld<=abc", "cannot read gate"),
        ("accuracy>=0.5", "unknown metric 'accuracy'"),
        ("task>=0.5", "unknown metric"),
        ("kld<=0.1MB", "unit 'mb' does not fit kld"),
        ("size<=3parsecs", "unit 'parsecs' does not fit size"),
        ("ppl_ratio<=1.1x", "already relative"),
    ],
)
def test_bad_gates_are_errors_naming_the_gate_and_the_syntax(text: str, why: str) -> None:
    with pytest.raises(GateError, match=why) as info:
        parse_gate(text)
    assert isinstance(info.value, TinyLLMError) and repr(text) in str(info.value)
    if "cannot read" in why or "unknown" in why:
        assert "METRIC OP VALUE" in str(info.value)


def test_absolute_gates_compare_the_results_numbers() -> None:
    gates = ["kld<=0.1", "kld<0.05", "size<=90MB", "size<=40MB", "latency<=10ms", "top1>=95%"]
    got = {r.gate: r for r in check_gates(RESULT, gates)}
    assert [r.passed for r in got.values()] == [True, False, True, False, True, False]
    assert got["kld<0.05"].value == 0.05 and got["kld<0.05"].limit == 0.05  # strict: equal fails
    assert got["latency<=10ms"].value == pytest.approx(1 / 200)
    assert "fails size<=40MB" in got["size<=40MB"].message
    assert "2 of 6 gates failed" not in summary(list(got.values()))
    assert summary(list(got.values())).startswith("3 of 6 gates failed")


def test_relative_gates_scale_the_baselines_number() -> None:
    res = check_gates(
        RESULT,
        ["ppl<=1.06x", "ppl<=1.05x", "task:analogy>=0.95x", "task:analogy>=0.97x", "size<0.3x"],
        BASELINE,
    )
    assert [r.passed for r in res] == [True, False, True, False, True]
    assert res[0].limit == pytest.approx(19.0 * 1.06)
    assert res[3].limit == pytest.approx(0.42 * 0.97) and "0.97x baseline" in res[3].message
    ratio = check_gates(RESULT, ["ppl_ratio<=1.06", "ppl_ratio<=1.05"], BASELINE)
    assert ratio[0].value == pytest.approx(20 / 19) and [r.passed for r in ratio] == [True, False]


def test_relative_gate_without_baseline_is_an_error() -> None:
    with pytest.raises(GateError, match="relative to a baseline"):
        check_gates(RESULT, ["kld<=0.1", "ppl<=1.05x"])
    with pytest.raises(GateError, match="relative to a baseline"):
        check_gates(RESULT, ["ppl_ratio<=1.1"])


def test_missing_metrics_fail_and_say_how_to_get_them() -> None:
    plain = {k: v for k, v in RESULT.items() if k != "tasks"} | {
        "kld": None,
        "top1_agreement": None,
    }
    res = check_gates(plain, ["kld<=1", "task:analogy>=0", "energy<=100J", "top1>=0"])
    assert not any(r.passed for r in res) and all(r.value is None for r in res)
    assert "--reference" in res[0].message
    assert "--tasks analogy" in res[1].message
    assert "hardware counters" in res[2].message and "--reference" in res[3].message
    rel = check_gates(RESULT, ["kld<=2x"], BASELINE)[0]  # the baseline has no KLD
    assert not rel.passed and "baseline lacks kld" in rel.message
    nan = check_gates(RESULT | {"perplexity": float("nan")}, ["ppl<1e9"])[0]
    assert not nan.passed and nan.value is None


def test_junit_xml_parses_and_counts(tmp_path) -> None:
    res = check_gates(RESULT, ["kld<=0.1", "size<=40MB", "task:x>=0.5"])
    path = tmp_path / "ci" / "gates.xml"
    write_junit(path, "tinyllm eval model", res)
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites" and root.get("tests") == "3" and root.get("failures") == "2"
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "tinyllm eval model" and suite.get("failures") == "2"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["kld<=0.1", "size<=40MB", "task:x>=0.5"]
    assert [c.find("failure") is None for c in cases] == [True, False, False]
    assert "fails size<=40MB" in cases[1].find("failure").get("message")
    write_junit_suites(path, {"stage 1": res[:1], "stage 2": res[1:]})
    root = ET.parse(path).getroot()
    assert [s.get("tests") for s in root.findall("testsuite")] == ["1", "2"]
    assert root.get("failures") == "2" and not list(tmp_path.glob("ci/.*tmp"))


def test_load_baseline_checks_the_file(tmp_path) -> None:
    good = tmp_path / "b.json"
    good.write_text(json.dumps(BASELINE))
    assert load_baseline(good)["perplexity"] == 19.0
    with pytest.raises(GateError, match="does not exist"):
        load_baseline(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GateError, match="is not JSON"):
        load_baseline(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(GateError, match="not an evaluation result"):
        load_baseline(tmp_path / "list.json")
