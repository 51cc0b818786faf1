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
