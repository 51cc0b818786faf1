"""Process memory."""

from __future__ import annotations

import resource
import sys

import psutil


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """Peak resident set size during a `with` block, sampled by a background thread.

    The process-wide peak (`peak_rss_bytes`) only grows; this measures one stage of a longer run.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def available_bytes() -> int:
    """Memory available to new allocations now (what the OS reports as available)."""
    return int(psutil.virtual_memory().available)


def trim_heap() -> None:
    """Give the C allocator's freed memory back to the OS (glibc `malloc_trim`; a no-op where it
    is not available). Freed buffers under glibc's mmap threshold (32 MiB at most) stay in the
    process's heaps; loading or streaming a large model frees thousands of them, which a
    one-shard-at-a-time loader would otherwise carry as resident memory (4 GB on an 8B model)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
