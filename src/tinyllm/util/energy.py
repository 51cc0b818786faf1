"""Energy from hardware counters: Linux powercap/RAPL and NVML (docs/energy.md).

An `EnergyMeter` reads the counters the host exposes for the devices a job uses: the RAPL
package zones under `/sys/class/powercap` (or `$TINYLLM_POWERCAP_ROOT`) always, and NVML's
total-energy counter of each CUDA device in use when `pynvml` is importable. Where none can be
read it says why ("unavailable on this host: ..."); it never estimates.

The meter is a stopwatch for joules: `start()`/`stop()` (or `with meter:`) may be repeated and
the reading is the total over every interval. Each read folds the counters' change since the
previous read into the total, so a counter that wraps (RAPL's `max_energy_range_uj`) is bridged
as long as it is read at least once per wrap period.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

log = logging.getLogger(__name__)

POWERCAP_ENV = "TINYLLM_POWERCAP_ROOT"
POWERCAP_ROOT = Path("/sys/class/powercap")
UNAVAILABLE = "unavailable on this host"


@dataclass(frozen=True)
class EnergyReading:
    """Joules over the measured intervals (None: no counter), where they came from, how long."""

    joules: float | None
    source: str
    seconds: float

    @property
    def available(self) -> bool:
        return self.joules is not None

    def per(self, count: int) -> float | None:
        """Joules per unit of work (token, request); None without a figure or without work."""
        return self.joules / count if self.joules is not None and count > 0 else None


@dataclass
class Counter:
    """One hardware energy counter: how to read its raw value and what a count is worth."""

    label: str  # "package-0", "GPU 0"
    read: Callable[[], int]
    joules_per_count: float  # 1e-6 for RAPL's microjoules, 1e-3 for NVML's millijoules
    max_range: int | None = None  # the counter wraps to 0 after this value (None: never)


def counter_delta(start: int, end: int, max_range: int | None) -> int:
    """Counts between two raw readings, across at most one wrap at `max_range`."""
    if end >= start:
        return end - start
    if max_range:
        return end + max_range - start
    log.warning("an energy counter went backwards (%d -> %d) with no range: reset?", start, end)
    return end  # a counter without a range that decreases was reset (driver reload)


def powercap_root(root: str | Path | None = None) -> Path:
    """The powercap tree to read: `root`, else $TINYLLM_POWERCAP_ROOT, else /sys/class/powercap."""
    return Path(root or os.environ.get(POWERCAP_ENV) or POWERCAP_ROOT)


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def _zone_name(zone: Path) -> str:
    try:
        return zone.joinpath("name").read_text().strip() or zone.name
    except OSError:
        return zone.name


def _top_zones(root: Path) -> list[Path]:
    """Top-level zones with an energy counter (intel-rapl:0, not its subzone intel-rapl:0:0).

    Zones that repeat a name already seen (a package also exposed through intel-rapl-mmio) are
    dropped, and so is `psys` (the whole platform, packages included) when packages are there.
    """
    zones = [z for z in sorted(root.iterdir()) if z.name.count(":") == 1]
    zones = [z for z in zones if z.joinpath("energy_uj").exists()]
    by_name: dict[str, Path] = {}
    for z in sorted(zones, key=lambda z: (not z.name.startswith("intel-rapl:"), z.name)):
        by_name.setdefault(_zone_name(z), z)
    if any(name != "psys" for name in by_name):
        by_name.pop("psys", None)
    return sorted(by_name.values(), key=lambda z: z.name)


def _rapl_counter(zone: Path) -> Counter:
    """A RAPL zone's counter; OSError if its energy_uj cannot be read (checked once here)."""
    energy = zone / "energy_uj"
    _read_int(energy)
    try:
        max_range = _read_int(zone / "max_energy_range_uj")
    except (OSError, ValueError):
        max_range = None
    return Counter(_zone_name(zone), lambda: _read_int(energy), 1e-6, max_range)


def rapl_counters(root: str | Path | None = None) -> tuple[list[Counter], str | None]:
    """The RAPL package counters under the powercap tree, or none and the reason why."""
    base = powercap_root(root)
    if not base.is_dir():
        return [], f"no {base}"
    zones = _top_zones(base)
    if not zones:
        return [], f"no RAPL zone with an energy_uj counter under {base}"
    counters = []
    for zone in zones:
        try:
            counters.append(_rapl_counter(zone))
        except PermissionError:
            return [], (
                f"{zone / 'energy_uj'} is not readable (permission denied: since Linux 5.10 "
                "only root reads RAPL counters; run as root or make energy_uj readable)"
            )
        except (OSError, ValueError) as e:
            return [], f"cannot read {zone / 'energy_uj'} ({e})"
    return counters, None


def nvml_counters(indices: Sequence[int]) -> tuple[list[Counter], str | None]:
    """NVML's total-energy counter (mJ since driver load) of each CUDA device index in use."""
    try:
        import pynvml
    except ImportError:
        return [], "pynvml is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()  # reference-counted by NVML; left initialised for the process
        counters = []
        for index in indices:
            handle = _nvml_handle(pynvml, index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # NotSupported before Volta
            counters.append(Counter(f"GPU {index}", _nvml_reader(pynvml, handle), 1e-3))
    except (pynvml.NVMLError, RuntimeError) as e:  # RuntimeError: torch's device properties
        return [], f"NVML cannot read the GPU's energy counter ({e})"
    return counters, None


def _nvml_reader(pynvml: object, handle: object) -> Callable[[], int]:
    return lambda: int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))


def _nvml_handle(pynvml: object, index: int) -> object:
    """The NVML handle of torch's cuda:index, matched by UUID (CUDA_VISIBLE_DEVICES renumbers)."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}".encode())
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def _cuda_indices(devices: Sequence[torch.device | str]) -> list[int]:
    found = {torch.device(d) for d in devices}
    cuda = [d for d in found if d.type == "cuda"]
    return sorted({d.index if d.index is not None else torch.cuda.current_device() for d in cuda})


def discover(
    devices: Sequence[torch.device | str] = ("cpu",), root: str | Path | None = None
) -> tuple[list[Counter], str]:
    """The counters for a job on `devices` and the source line that names them (or says why not).

    RAPL's packages count for every job (the host feeds the GPU too); NVML adds each GPU in use.
    """
    rapl, rapl_why = rapl_counters(root)
    gpus = _cuda_indices(devices)
    nvml, nvml_why = nvml_counters(gpus) if gpus else ([], None)
    parts = []
    if rapl:
        parts.append(f"rapl ({', '.join(c.label for c in rapl)})")
    if nvml:
        parts.append(f"nvml ({', '.join(c.label for c in nvml)})")
    reasons = [f"rapl: {rapl_why}" if gpus else rapl_why] if rapl_why else []
    reasons += [f"nvml: {nvml_why}"] if nvml_why else []
    if not parts:
        return [], f"{UNAVAILABLE}: {'; '.join(reasons)}"
    missing = f" (not counted: {'; '.join(reasons)})" if reasons else ""
    return rapl + nvml, " + ".join(parts) + missing


class EnergyMeter:
    """Joules the host's counters measure over one or more intervals (a stopwatch for energy).

    `with meter:` (or `start()` ... `stop()`) adds an interval; `reading()` is the total so far,
    the running interval included. Safe to read from several threads.
    """

    def __init__(
        self, devices: Sequence[torch.device | str] = ("cpu",), root: str | Path | None = None
    ) -> None:
        self.counters, self.source = discover(devices, root)
        self._lock = threading.Lock()
        self._last: list[int] = []
        self._counts = [0] * len(self.counters)
        self._seconds = 0.0
        self._since: float | None = None  # perf_counter at the running interval's start

    @property
    def available(self) -> bool:
        return bool(self.counters)

    def start(self) -> EnergyMeter:
        with self._lock:
            if self._since is None:
                self._last = [c.read() for c in self.counters]
                self._since = time.perf_counter()
        return self

    def stop(self) -> EnergyReading:
        with self._lock:
            if self._since is not None:
                self._advance()
                self._seconds += time.perf_counter() - self._since
                self._since = None
            return self._reading(self._seconds)

    def reading(self) -> EnergyReading:
        """The total over every interval so far, the running one included (its counters read)."""
        with self._lock:
            seconds = self._seconds
            if self._since is not None:
                self._advance()
                seconds += time.perf_counter() - self._since
            return self._reading(seconds)

    def _advance(self) -> None:
        """Fold each counter's change since the last read into the totals (lock held)."""
        now = [c.read() for c in self.counters]
        for i, (c, a, b) in enumerate(zip(self.counters, self._last, now, strict=True)):
            self._counts[i] += counter_delta(a, b, c.max_range)
        self._last = now

    def _reading(self, seconds: float) -> EnergyReading:
        if not self.counters:
            return EnergyReading(None, self.source, seconds)
        joules = sum(
            n * c.joules_per_count for n, c in zip(self._counts, self.counters, strict=True)
        )
        return EnergyReading(joules, self.source, seconds)

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
