"""Who runs next: tenant queues with fair share, priorities and concurrency limits, and a
latency governor that shrinks the batch when inter-token latency misses its target and turns
new work away (with a retry estimate) when the queue cannot meet it.

Fair share is weighted virtual time: a tenant's clock advances by one per generated token divided
by its weight, and among tenants of the highest waiting priority the one with the earliest clock
goes next. A tenant that was idle rejoins at the earliest clock of the active ones, so idling
earns no credit to starve others with later.
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """New work is turned away; `retry_after` is a whole number of seconds to wait."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass
class Tenant:
    name: str
    weight: float = 1.0
    priority: int = 0
    max_concurrency: int | None = None
    max_queue: int | None = None  # waiting requests of this tenant; None: its share of the queue
    clock: float = 0.0  # virtual time: generated tokens / weight
    running: int = 0
    queue: collections.deque = field(default_factory=collections.deque)

    @property
    def can_run_more(self) -> bool:
        return self.max_concurrency is None or self.running < self.max_concurrency


@dataclass
class SchedulerConfig:
    max_batch: int = 32  # sequences decoding at once, at most
    max_queue: int = 256  # waiting requests over all tenants before 429 (split among tenants)
    target_itl_p95: float | None = None  # seconds; None: no latency governor
    window: int = 32  # steps the governor looks back over


class Scheduler:
    def __init__(self, cfg: SchedulerConfig | None = None) -> None:
        self.cfg = cfg or SchedulerConfig()
        self.tenants: dict[str, Tenant] = {}
        self.batch_cap = self.cfg.max_batch
        self.step_times: collections.deque[float] = collections.deque(maxlen=self.cfg.window)
        self.request_times: collections.deque[float] = collections.deque(maxlen=64)
        self.rejected = 0

    def tenant(self, name: str, **settings: Any) -> Tenant:
        t = self.tenants.get(name)
        if t is None:
            t = self.tenants[name] = Tenant(name, **settings)
        return t

    @property
    def waiting(self) -> int:
        return sum(len(t.queue) for t in self.tenants.values())

    @property
    def running(self) -> int:
        return sum(t.running for t in self.tenants.values())

    # --- queueing ---------------------------------------------------------------------------
    def enqueue(self, tenant: str, item: Any, front: bool = False) -> None:
        t = self.tenant(tenant)
        if not front:
            self._check_admission(t)
        if not t.queue and t.running == 0:
            active = [x.clock for x in self.tenants.values() if x.queue or x.running]
            t.clock = max(t.clock, min(active, default=t.clock))
        (t.queue.appendleft if front else t.queue.append)(item)

    def quota(self, t: Tenant) -> int:
        """How many requests tenant t may have waiting: its own max_queue, else an equal share
        of max_queue among the known tenants, so one tenant cannot fill the queue for all."""
        if t.max_queue is not None:
            return t.max_queue
        return max(1, self.cfg.max_queue // max(1, len(self.tenants)))

    def _check_admission(self, t: Tenant) -> None:
        waiting = self.waiting
        if len(t.queue) >= self.quota(t):
            self._reject(f"tenant '{t.name}' has {len(t.queue)} requests waiting (its quota)")
        if waiting >= self.cfg.max_queue:
            self._reject(f"queue is full ({waiting} waiting)")
        throttled = self.batch_cap < self.cfg.max_batch
        share = max(1, self.batch_cap // max(1, sum(1 for x in self.tenants.values() if x.queue)))
        if throttled and waiting >= self.batch_cap and len(t.queue) >= share:
            self._reject(
                f"inter-token latency is over its target; the batch is held at {self.batch_cap} "
                f"and {waiting} requests already wait"
            )

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        raise QueueFull(reason, self.retry_after())

    def retry_after(self) -> int:
        """Seconds until the queue ahead would drain at the current batch size."""
        per_request = statistics.median(self.request_times) if self.request_times else 1.0
        rounds = (self.waiting + 1) / max(1, self.batch_cap)
        return max(1, math.ceil(rounds * per_request))

    def remove(self, tenant: str, item: Any) -> bool:
        t = self.tenants.get(tenant)
        if t is not None and item in t.queue:
            t.queue.remove(item)
            return True
        return False

    def next(self, fits: Callable[[Any], bool]) -> tuple[str, Any] | None:
        """Pop the next request to admit, or None (batch full, limits reached, or no ready
        tenant's head fits the KV cache yet: `fits` decides). Tenants are tried in order of
        priority and fair-share clock; one whose head does not fit is passed over, so a large
        request waits for room without holding up the other tenants."""
        if self.running >= self.batch_cap:
            return None
        ready = [t for t in self.tenants.values() if t.queue and t.can_run_more]
        for t in sorted(ready, key=lambda x: (-x.priority, x.clock)):
            if fits(t.queue[0]):
                t.running += 1
                return t.name, t.queue.popleft()
        return None

    def finished(self, tenant: str, seconds: float | None = None) -> None:
        self.tenants[tenant].running -= 1
        if seconds is not None:
            self.request_times.append(seconds)

    def charge(self, tenant: str, tokens: int) -> None:
        t = self.tenants[tenant]
        t.clock += tokens / t.weight

    # --- latency governor -------------------------------------------------------------------
    def observe_step(self, seconds: float) -> None:
        """One decode step took `seconds` (every decoding sequence waited that long)."""
        target = self.cfg.target_itl_p95
        self.step_times.append(seconds)
        if target is None or len(self.step_times) < self.cfg.window // 2:
            return
        p95 = percentile(list(self.step_times), 0.95)
        if p95 > target and self.batch_cap > 1:
            self.batch_cap = max(1, int(self.batch_cap * 0.75))
            self.step_times.clear()
        elif p95 < 0.8 * target and self.batch_cap < self.cfg.max_batch:
            self.batch_cap += 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]
