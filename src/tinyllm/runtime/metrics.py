"""Engine and server metrics, rendered in Prometheus' text exposition format (version 0.0.4).

Histograms keep cumulative bucket counts, a sum and a count, as Prometheus expects; they also
keep the last few thousand raw values so `tinyllm bench` can print exact percentiles. Energy
(`tinyllm_energy_joules_total`) is read from the host's counters at scrape time (util.energy).
"""

from __future__ import annotations

import bisect
import collections
import threading
import time

from tinyllm.runtime.scheduler import percentile
from tinyllm.util.energy import EnergyMeter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS, keep: int = 4096) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0
        self.recent: collections.deque[float] = collections.deque(maxlen=keep)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1
        self.recent.append(value)

    def quantile(self, q: float) -> float:
        return percentile(list(self.recent), q)

    def render(self, name: str, help_: str) -> list[str]:
        lines = _header(name, help_, "histogram")
        total = 0
        for bound, c in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += c
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{le}"}} {total}')
        lines += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ttft = Histogram()
        self.itl = Histogram()
        self.step_time = Histogram()
        self.tokens_generated = 0
        self.tokens_computed = 0
        self.prefix_tokens_reused = 0
        self.preemptions = 0
        self.sampling_fallbacks = 0  # non-finite probabilities: argmax taken instead of a draw
        self.nonfinite_logits = 0  # sequences ended because the model produced NaN/inf logits
        self.step_failures = 0  # engine steps that raised (their sequences ended with an error)
        self.draft_tokens = 0  # speculative decoding: tokens proposed, and those accepted
        self.draft_accepted = 0
        self.rejections: collections.Counter[str] = collections.Counter()
        self.finishes: collections.Counter[str] = collections.Counter()
        self.queue: dict[str, int] = {}
        self.kv_blocks_used = 0
        self.kv_blocks_total = 0
        self.started = time.time()
        self._rate: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)
        self.energy: EnergyMeter | None = None  # set by start_energy (the server, at start)

    def start_energy(self, meter: EnergyMeter) -> None:
        """Count energy from now on with `meter` (started here); /metrics reads it at scrape."""
        self.energy = meter.start()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def step(self, seconds: float, tokens: int, kv_used: int) -> None:
        self.step_time.observe(seconds)
        self.tokens_computed += tokens
        self.kv_blocks_used = kv_used
        self._rate.append((time.perf_counter(), self.tokens_generated))

    def drafted(self, proposed: int, accepted: int) -> None:
        self.draft_tokens += proposed
        self.draft_accepted += accepted

    def prefix_hit(self, tokens: int) -> None:
        self.prefix_tokens_reused += tokens

    def finished(self, reason: str) -> None:
        self.finishes[reason] += 1

    def rejected(self, reason: str) -> None:
        with self.lock:
            self.rejections[reason] += 1

    def queue_depth(self, depths: dict[str, int]) -> None:
        self.queue = dict(depths)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the recent steps."""
        if len(self._rate) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def render(self, running: int) -> str:
        """Every metric in Prometheus' text exposition format."""
        lines: list[str] = []
        lines += self.ttft.render("tinyllm_time_to_first_token_seconds", "Time to first token.")
        lines += self.itl.render("tinyllm_inter_token_latency_seconds", "Time between tokens.")
        lines += self.step_time.render("tinyllm_step_seconds", "Duration of an engine step.")
        for kind, rows in (("counter", self._counters()), ("gauge", self._gauges(running))):
            for short, help_, value in rows:
                name = f"tinyllm_{short}"
                lines += [*_header(name, help_, kind), f"{name} {value}"]
        lines += _labelled(
            "tinyllm_queue_depth", "Waiting requests per tenant.", "gauge", "tenant", self.queue
        )
        lines += _labelled(
            "tinyllm_rejections_total",
            "Requests turned away.",
            "counter",
            "reason",
            self.rejections,
        )
        lines += _labelled(
            "tinyllm_finished_total", "Finished sequences.", "counter", "reason", self.finishes
        )
        lines += self._energy_lines()
        return "\n".join(lines) + "\n"

    def _energy_lines(self) -> list[str]:
        """Joules since the meter started (only when a counter exists) and where they come from."""
        if self.energy is None:
            return []
        reading = self.energy.reading()
        lines = _labelled(
            "tinyllm_energy_info",
            "Source of the energy figures (1: counters read; 0: unavailable, the label says why).",
            "gauge",
            "source",
            {reading.source: int(reading.available)},
        )
        if reading.joules is not None:
            name = "tinyllm_energy_joules_total"
            help_ = "Energy the host's counters measured since the server started (joules)."
            lines += [*_header(name, help_, "counter"), f"{name} {reading.joules:.6f}"]
        return lines

    def _counters(self) -> list[tuple[str, str, float]]:
        """(name after tinyllm_, help, value) of each single-valued counter."""
        return [
            ("generated_tokens_total", "Tokens generated.", self.tokens_generated),
            ("computed_tokens_total", "Tokens run through the model.", self.tokens_computed),
            (
                "prefix_cache_tokens_total",
                "Prompt tokens reused from shared KV blocks.",
                self.prefix_tokens_reused,
            ),
            ("preemptions_total", "Sequences preempted for KV space.", self.preemptions),
            ("draft_tokens_total", "Speculative draft tokens proposed.", self.draft_tokens),
            (
                "draft_accepted_tokens_total",
                "Speculative draft tokens accepted (what greedy decoding would have produced).",
                self.draft_accepted,
            ),
            (
                "sampling_fallbacks_total",
                "Draws replaced by the argmax because the probabilities were not finite.",
                self.sampling_fallbacks,
            ),
            (
                "nonfinite_logits_total",
                "Sequences ended because the model produced NaN or infinite logits.",
                self.nonfinite_logits,
            ),
            (
                "step_failures_total",
                "Engine steps that failed (their sequences ended with an error).",
                self.step_failures,
            ),
        ]

    def _gauges(self, running: int) -> list[tuple[str, str, float]]:
        """(name after tinyllm_, help, value) of each single-valued gauge."""
        return [
            (
                "tokens_per_second",
                "Generated tokens per second, recent steps.",
                round(self.tokens_per_second(), 3),
            ),
            ("kv_blocks_used", "KV cache blocks in use.", self.kv_blocks_used),
            ("kv_blocks_total", "KV cache blocks in the pool.", self.kv_blocks_total),
            ("running_sequences", "Sequences in the running batch.", running),
        ]


def _header(name: str, help_: str, kind: str) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]


def _labelled(name: str, help_: str, kind: str, label: str, counts: dict[str, int]) -> list[str]:
    """A metric with one sample per label value, in label order."""
    samples = [f'{name}{{{label}="{_esc(k)}"}} {n}' for k, n in sorted(counts.items())]
    return _header(name, help_, kind) + samples


def _esc(label: str) -> str:
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
