"""Energy counters on fake powercap trees: which zones count, the arithmetic, and 'unavailable'."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from tinyllm.util import energy
from tinyllm.util.energy import (
    UNAVAILABLE,
    EnergyMeter,
    EnergyReading,
    counter_delta,
    discover,
    powercap_root,
)

MAX = 262_143_328_850  # a real package's max_energy_range_uj


def zone(root: Path, name: str, label: str, uj: int, max_uj: int | None = MAX) -> Path:
    """A powercap zone directory as the kernel lays it out: name, energy_uj, max_energy_range_uj."""
    z = root / name
    z.mkdir(parents=True)
    (z / "name").write_text(label + "\n")
    (z / "energy_uj").write_text(f"{uj}\n")
    if max_uj is not None:
        (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def set_uj(z: Path, uj: int) -> None:
    (z / "energy_uj").write_text(f"{uj}\n")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Two packages with their core/dram subzones, and the bare control-type directory."""
    root = tmp_path / "powercap"
    (root / "intel-rapl").mkdir(parents=True)  # the control type: no energy_uj
    zone(root, "intel-rapl:0", "package-0", 1_000_000)
    zone(root, "intel-rapl:0:0", "core", 500_000)
    zone(root, "intel-rapl:0:1", "dram", 100_000)
    zone(root, "intel-rapl:1", "package-1", 2_000_000)
    zone(root, "intel-rapl:1:0", "core", 700_000)
    return root


def test_counter_delta_plain_wrapped_and_reset() -> None:
    assert counter_delta(100, 350, MAX) == 250
    assert counter_delta(MAX - 1_000, 4_000, MAX) == 5_000  # wrapped once
    assert counter_delta(5_000, 2_000, None) == 2_000  # no range: a reset, count from zero


def test_sums_package_zones_and_skips_subzones(tree: Path) -> None:
    meter = EnergyMeter(root=tree)
    assert meter.source == "rapl (package-0, package-1)"
    meter.start()
    set_uj(tree / "intel-rapl:0", 3_500_000)  # +2.5 J
    set_uj(tree / "intel-rapl:1", 2_250_000)  # +0.25 J
    set_uj(tree / "intel-rapl:0:0", 9_000_000)  # subzones move too: part of package-0 already
    set_uj(tree / "intel-rapl:0:1", 9_000_000)
    reading = meter.stop()
    assert reading.joules == pytest.approx(2.75)
    assert reading.seconds > 0 and reading.available
    assert reading.per(11) == pytest.approx(0.25)


def test_wraparound_uses_max_energy_range(tmp_path: Path) -> None:
    z = zone(tmp_path, "intel-rapl:0", "package-0", MAX - 2_000_000)
    with EnergyMeter(root=tmp_path) as meter:
        set_uj(z, 3_000_000)  # past the top: 2 J before the wrap, 3 J after
    assert meter.reading().joules == pytest.approx(5.0)


def test_reads_between_wraps_bridge_several_wraps(tmp_path: Path) -> None:
    small = 10_000_000  # a 10 J counter: wraps many times over the run
    z = zone(tmp_path, "intel-rapl:0", "package-0", 9_000_000, max_uj=small)
    meter = EnergyMeter(root=tmp_path).start()
    for uj in (4_000_000, 1_000_000, 6_000_000):  # +5 J, +7 J, +5 J: two wraps
        set_uj(z, uj)
        meter.reading()  # as a /metrics scrape does
    assert meter.stop().joules == pytest.approx(17.0)


def test_intervals_add_up_and_the_gaps_do_not_count(tmp_path: Path) -> None:
    z = zone(tmp_path, "intel-rapl:0", "package-0", 0)
    meter = EnergyMeter(root=tmp_path)
    with meter:
        set_uj(z, 1_000_000)
    set_uj(z, 50_000_000)  # between intervals: not counted
    with meter:
        set_uj(z, 52_000_000)
    assert meter.reading().joules == pytest.approx(3.0)


def test_unchanged_counters_read_zero(tree: Path) -> None:
    with EnergyMeter(root=tree) as meter:
        pass
    assert meter.reading().joules == 0.0


def test_mmio_duplicate_and_psys_are_not_double_counted(tmp_path: Path) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 0)
    zone(tmp_path, "intel-rapl:1", "psys", 0)  # the whole platform: includes package-0
    zone(tmp_path, "intel-rapl-mmio:0", "package-0", 0)  # the same package through MMIO
    counters, source = discover(root=tmp_path)
    assert source == "rapl (package-0)" and len(counters) == 1


def test_missing_powercap_is_unavailable(tmp_path: Path) -> None:
    meter = EnergyMeter(root=tmp_path / "nothing")
    with meter:
        pass
    reading = meter.reading()
    assert reading.joules is None and reading.per(10) is None and not meter.available
    assert reading.source == f"{UNAVAILABLE}: no {tmp_path / 'nothing'}"


def test_no_rapl_zone_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dtpm").mkdir()  # a powercap tree with no energy counter
    assert EnergyMeter(root=tmp_path).source.startswith(f"{UNAVAILABLE}: no RAPL zone")


def test_permission_denied_is_unavailable_with_the_reason(tree: Path, monkeypatch) -> None:
    real = energy._read_int

    def root_only(path: Path) -> int:  # what non-root sees on Linux >= 5.10 (mode 0400)
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(energy, "_read_int", root_only)
    meter = EnergyMeter(root=tree)
    assert meter.reading().joules is None
    assert meter.source.startswith(f"{UNAVAILABLE}: ")
    assert "permission denied" in meter.source and "Linux 5.10" in meter.source


def test_root_from_argument_env_or_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TINYLLM_POWERCAP_ROOT", raising=False)
    assert powercap_root() == Path("/sys/class/powercap")
    monkeypatch.setenv("TINYLLM_POWERCAP_ROOT", str(tmp_path))
    assert powercap_root() == tmp_path
    assert powercap_root(tmp_path / "x") == tmp_path / "x"


def test_gpu_without_pynvml_keeps_rapl_and_says_what_is_missing(tree: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    counters, source = discover(["cuda:0"], root=tree)
    assert len(counters) == 2
    assert source == (
        "rapl (package-0, package-1) (not counted: nvml: pynvml is not installed "
        "(pip install nvidia-ml-py))"
    )


def fake_pynvml(monkeypatch, total: dict[str, int], supported: bool = True) -> list[bytes]:
    """A stand-in pynvml module (no GPU here): one GPU whose counter is total["mj"]."""
    looked_up: list[bytes] = []

    class NVMLError(Exception):
        pass

    def energy_of(handle: str) -> int:
        if not supported:
            raise NVMLError("Not Supported")
        return total["mj"]

    fake = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda u: looked_up.append(u) or "handle",
        nvmlDeviceGetTotalEnergyConsumption=energy_of,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    props = types.SimpleNamespace(uuid="5ae1-77")  # torch's cuda:0 after CUDA_VISIBLE_DEVICES
    monkeypatch.setattr(energy.torch.cuda, "get_device_properties", lambda i: props)
    return looked_up


def test_nvml_counter_in_millijoules(tmp_path: Path, monkeypatch) -> None:
    total = {"mj": 1_000}
    looked_up = fake_pynvml(monkeypatch, total)
    meter = EnergyMeter(["cuda:0"], root=tmp_path / "none")
    assert looked_up == [b"GPU-5ae1-77"]  # matched by UUID, not by index
    assert meter.source == f"nvml (GPU 0) (not counted: rapl: no {tmp_path / 'none'})"
    with meter:
        total["mj"] += 4_500
    assert meter.reading() == EnergyReading(4.5, meter.source, meter.reading().seconds)


def test_gpu_without_an_energy_counter(tree: Path, monkeypatch) -> None:
    fake_pynvml(monkeypatch, {"mj": 0}, supported=False)  # before Volta
    counters, source = discover(["cuda:0"], root=tree)
    assert len(counters) == 2 and "nvml: NVML cannot read" in source and "Not Supported" in source
    counters, source = discover(["cuda:0"], root=tree / "none")
    assert not counters and source.startswith(f"{UNAVAILABLE}: rapl: no ")


# ---- carried by `tinyllm eval`, `tinyllm bench` and /metrics ---------------------------------


def bump_on_call(monkeypatch, owner: object, attr: str, z: Path, uj: int) -> list[int]:
    """Make owner.attr raise zone z's counter by `uj` on each call; -> the list of calls made."""
    real = getattr(owner, attr)
    calls: list[int] = []

    def bumped(*args, **kwargs):
        calls.append(1)
        set_uj(z, int((z / "energy_uj").read_text()) + uj)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, bumped)
    return calls


def test_eval_counts_the_models_forwards_only(tokenizer, corpus_file, tmp_path, monkeypatch):
    import tinyllm
    from tests.conftest import tiny_model
    from tinyllm.eval import evaluate as ev

    z = zone(tmp_path / "pc", "intel-rapl:0", "package-0", 0)
    monkeypatch.setenv("TINYLLM_POWERCAP_ROOT", str(tmp_path / "pc"))
    calls = bump_on_call(monkeypatch, ev, "_logits", z, 1_000_000)  # 1 J per forward
    model = tiny_model(vocab=len(tokenizer))
    r = tinyllm.evaluate(
        model, tokenizer, corpus=corpus_file, seq_len=16, windows=4, batch_size=2,
        reference=(tiny_model(vocab=len(tokenizer), seed=1), tokenizer),
    )  # fmt: skip
    assert len(calls) == 4  # two batches, each through the model and the reference
    assert r.energy_source == "rapl (package-0)"
    assert r.energy_joules == pytest.approx(2.0)  # the reference's forwards are not counted
    assert r.joules_per_token == pytest.approx(2.0 / r.tokens)


def test_eval_without_counters_says_unavailable(tokenizer, corpus_file, tmp_path, monkeypatch):
    import tinyllm
    from tests.conftest import tiny_model
    from tinyllm.cli._common import _eval_rows

    monkeypatch.setenv("TINYLLM_POWERCAP_ROOT", str(tmp_path / "absent"))
    model = tiny_model(vocab=len(tokenizer))
    r = tinyllm.evaluate(model, tokenizer, corpus=corpus_file, seq_len=16, windows=2)
    assert r.energy_joules is None and r.joules_per_token is None
    assert r.energy_source == f"{UNAVAILABLE}: no {tmp_path / 'absent'}"
    assert dict(_eval_rows(r))["energy"] == r.energy_source
    r.joules_per_token, r.energy_source = 0.0123456, "rapl (package-0)"
    assert dict(_eval_rows(r))["energy"] == "0.01235 J/token (rapl (package-0))"


def test_eval_cli_reports_energy(tiny_dir, corpus_file, tmp_path, monkeypatch):
    import json

    from tests.test_cli import run

    zone(tmp_path / "pc", "intel-rapl:0", "package-0", 5_000_000)
    monkeypatch.setenv("TINYLLM_POWERCAP_ROOT", str(tmp_path / "pc"))
    out = tmp_path / "r.json"
    args = ["--corpus", str(corpus_file), "--seq-len", "16", "--windows", "2", "--json", str(out)]
    p = run("eval", str(tiny_dir), *args)
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    assert data["energy_source"] == "rapl (package-0)"
    assert data["energy_joules"] == 0.0 and data["joules_per_token"] == 0.0  # a still counter
    assert "J/token (rapl (package-0))" in p.stdout


def test_bench_reports_joules_per_generated_token(tokenizer, tmp_path, monkeypatch):
    from tests.conftest import tiny_model
    from tinyllm.runtime import bench as bench_module
    from tinyllm.runtime.bench import bench
    from tinyllm.runtime.engine import Engine, EngineConfig

    z = zone(tmp_path / "pc", "intel-rapl:0", "package-0", 0)
    monkeypatch.setenv("TINYLLM_POWERCAP_ROOT", str(tmp_path / "pc"))
    engine = Engine(tiny_model(vocab=len(tokenizer)), tokenizer, EngineConfig(kv_memory_mb=1))
    steps = bump_on_call(monkeypatch, engine, "step", z, 1_000_000)  # 1 J per engine step
    prompts = [tokenizer.encode("The quick brown fox"), tokenizer.encode("Pack my box")]
    monkeypatch.setattr(bench_module, "bench_prompts", lambda tok, n, length: prompts[:n])
    [row] = bench(engine, [2], prompt_len=8, gen_len=5, repeats=1)
    assert row.energy_source == "rapl (package-0)"
    joules = row.joules_per_token * 2 * 5  # 2 streams x 5 tokens
    assert joules == pytest.approx(round(joules)) and 5 <= round(joules) < len(steps)
    assert row.to_dict()["joules_per_token"] == row.joules_per_token


def test_metrics_count_joules_only_with_a_counter(tmp_path: Path) -> None:
    from tinyllm.runtime.metrics import Metrics

    z = zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    m = Metrics()
    assert "tinyllm_energy" not in m.render(0)  # no meter: no lines
    m.start_energy(EnergyMeter(root=tmp_path))
    set_uj(z, 3_500_000)
    text = m.render(0)
    assert (
        "# TYPE tinyllm_energy_joules_total counter\ntinyllm_energy_joules_total 2.500000\n" in text
    )
    assert 'tinyllm_energy_info{source="rapl (package-0)"} 1\n' in text
    none = Metrics()
    none.start_energy(EnergyMeter(root=tmp_path / "absent"))
    text = none.render(0)
    assert "tinyllm_energy_joules_total" not in text
    assert f'tinyllm_energy_info{{source="{UNAVAILABLE}: no {tmp_path / "absent"}"}} 0' in text


def test_server_metrics_carry_energy_since_start(tokenizer, tmp_path, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    from tests.conftest import tiny_model
    from tinyllm.runtime.engine import Engine, EngineConfig
    from tinyllm.runtime.server import create_app

    z = zone(tmp_path / "pc", "intel-rapl:0", "package-0", 7_000_000)
    monkeypatch.setenv("TINYLLM_POWERCAP_ROOT", str(tmp_path / "pc"))
    engine = Engine(tiny_model(vocab=len(tokenizer)), tokenizer, EngineConfig(kv_memory_mb=1))
    app = create_app(engine, "tiny")
    with TestClient(app, base_url="http://localhost") as client:  # the server starts here
        set_uj(z, 8_250_000)
        text = client.get("/metrics").text
    assert "tinyllm_energy_joules_total 1.250000" in text
    assert 'tinyllm_energy_info{source="rapl (package-0)"} 1' in text
