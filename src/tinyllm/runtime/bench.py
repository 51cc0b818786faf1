"""`tinyllm bench`: the engine under 1..N concurrent streams, measured the same way each time.

For each concurrency c, c requests of `prompt_len` tokens (slices of the evaluation text, each
different so no prefix is shared) generating exactly `gen_len` tokens start together; the run
reports time to first token, inter-token latency percentiles, aggregate generated tokens per
second, the KV memory the batch held at its peak and the energy per generated token where the
host has energy counters (util.energy; docs/energy.md). Each level runs `repeats` times after one
warm-up; the median repeat (by tokens/s) is reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

from tinyllm.errors import ConfigError
from tinyllm.runtime.engine import Engine
from tinyllm.runtime.sampling import SamplingParams
from tinyllm.runtime.scheduler import SchedulerConfig, percentile
from tinyllm.util.energy import UNAVAILABLE, EnergyMeter, EnergyReading

# the printed table: a header per column, and BenchRow.cells() in the same order
COLUMNS = ("streams", "tokens/s", "decode tok/s", "TTFT p50 ms", "ITL p50 ms", "ITL p95 ms",
           "ITL p99 ms", "KV peak MiB", "J/token")  # fmt: skip


@dataclass
class BenchRow:
    concurrency: int
    prompt_len: int
    gen_len: int
    tokens_per_s: float  # generated tokens / wall time from submit, prefill included
    decode_tokens_per_s: float  # tokens after each stream's first / decode-phase wall time
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    itl_p99_ms: float
    kv_peak_mib: float  # blocks held at the peak x block bytes
    kv_bytes_per_token: int  # 2 x layers x kv_heads x head_dim x bytes
    joules_per_token: float | None = None  # the run's energy / generated tokens; None: no counter
    energy_source: str = UNAVAILABLE  # the counters read, or why there are none

    def to_dict(self) -> dict:
        return asdict(self)

    def cells(self) -> tuple[str, ...]:
        """The row as the table under COLUMNS shows it."""
        return (
            str(self.concurrency),
            f"{self.tokens_per_s:.1f}",
            f"{self.decode_tokens_per_s:.1f}",
            f"{self.ttft_p50_ms:.0f}",
            f"{self.itl_p50_ms:.1f}",
            f"{self.itl_p95_ms:.1f}",
            f"{self.itl_p99_ms:.1f}",
            f"{self.kv_peak_mib:.1f}",
            "n/a" if self.joules_per_token is None else f"{self.joules_per_token:.4g}",
        )


def parse_levels(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; anything else (words, zero, nothing) is a ConfigError."""
    try:
        levels = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--concurrency takes numbers like 1,4,16 (got '{text}')") from None
    if not levels or min(levels) < 1:
        raise ConfigError(f"--concurrency takes positive numbers like 1,4,16 (got '{text}')")
    return levels


def bench_scheduler(levels: list[int]) -> SchedulerConfig:
    """A scheduler that admits the largest level at once (and queues twice as many)."""
    return SchedulerConfig(max_batch=max(levels), max_queue=max(levels) * 2)


def bench_prompts(tokenizer: object, count: int, prompt_len: int) -> list[list[int]]:
    """`count` different prompts of `prompt_len` tokens from the evaluation text."""
    from tinyllm.data.corpora import load_corpus

    text = "\n\n".join(load_corpus("enwiki").documents)
    ids = tokenizer.encode(text[: 8 * prompt_len * count + 20000])
    if len(ids) < prompt_len * count:
        ids = ids * (prompt_len * count // max(1, len(ids)) + 1)
    return [ids[i * prompt_len : (i + 1) * prompt_len] for i in range(count)]


def run_level(
    engine: Engine, prompts: list[list[int]], gen_len: int, meter: EnergyMeter | None = None
) -> tuple[float, list, int]:
    """Run the prompts together to exactly gen_len tokens each: (wall s, sequences, peak blocks).

    `meter`, if given, counts the run (it is started here and stopped when the run ends)."""
    params = SamplingParams(max_tokens=gen_len, ignore_eos=True)
    if meter is not None:
        meter.start()
    t0 = time.perf_counter()
    seqs = [engine.submit(p, params) for p in prompts]
    peak = 0
    while any(s.finish_reason is None for s in seqs):
        engine.step()
        peak = max(peak, engine.cache.used_blocks)
    wall = time.perf_counter() - t0
    if meter is not None:
        meter.stop()
    return wall, seqs, peak


def decode_rate(times: list[list[float]]) -> float:
    """Steady-state decode tokens per second, all streams together: the tokens that arrive
    after every stream has its first token (so no prompt is being prefilled any more), over
    the time from that moment to the last token."""
    times = [t for t in times if t]
    start = max(t[0] for t in times)
    end = max(t[-1] for t in times)
    tokens = sum(sum(1 for x in t if x > start) for t in times)
    return tokens / (end - start) if end > start else float("nan")


def bench(
    engine: Engine, concurrency: list[int], prompt_len: int, gen_len: int, repeats: int = 3
) -> list[BenchRow]:
    rows = []
    for c in concurrency:
        prompts = bench_prompts(engine.tokenizer, c, prompt_len)
        run_level(engine, prompts, min(gen_len, 8))  # warm-up
        runs = []
        for _ in range(repeats):
            meter = EnergyMeter([engine.device])
            wall, seqs, peak = run_level(engine, prompts, gen_len, meter)
            runs.append((sum(len(s.output) for s in seqs) / wall, seqs, peak, meter.reading()))
        tps, seqs, peak, energy = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        rows.append(_row(engine, c, prompt_len, gen_len, tps, seqs, peak, energy))
    return rows


def _row(
    engine: Engine,
    c: int,
    prompt_len: int,
    gen_len: int,
    tps: float,
    seqs: list,
    peak: int,
    energy: EnergyReading,
) -> BenchRow:
    """One level's row from its median run: latencies, rates, KV peak and energy per token."""
    block_bytes = engine.cache.shape.bytes_per_token() * engine.cache.block_size
    ttft = [s.token_times[0] - s.arrival for s in seqs]
    itl = [b - a for s in seqs for a, b in zip(s.token_times, s.token_times[1:], strict=False)]
    return BenchRow(
        c,
        prompt_len,
        gen_len,
        tps,
        decode_rate([s.token_times for s in seqs]),
        1000 * statistics.median(ttft),
        1000 * percentile(ttft, 0.95),
        1000 * percentile(itl, 0.5),
        1000 * percentile(itl, 0.95),
        1000 * percentile(itl, 0.99),
        peak * block_bytes / 2**20,
        engine.cache.shape.bytes_per_token(),
        energy.per(sum(len(s.output) for s in seqs)),
        energy.source,
    )
