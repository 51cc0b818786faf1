"""Numbers as people read them."""

from __future__ import annotations


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB, one decimal above, GiB at most; None -> '-'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
