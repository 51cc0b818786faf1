"""Validation errors as one line a user can act on."""

from __future__ import annotations

from typing import Any


def first_error(exc: Any) -> str:
    """'field: message' of a pydantic ValidationError's first error (no field: the message)."""
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]
