"""A run directory's safety: one run at a time, and a checked `state.json`.

- `locked(out)`: an exclusive `flock` on `.NAME.lock` beside the run directory `NAME`, held for the
  whole run. The kernel releases it when the process ends, however it ends (SIGKILL included), so a
  crashed run never leaves a stale lock. The lock file sits beside the directory, not inside it, so
  `--overwrite` can swap the directory while the lock stays held; it is never deleted (deleting a
  lock file lets two processes lock two different files of one name).
- `read_state(out)`: `state.json` parsed and checked, or an error that says how to go on.

Starting a run over (`--overwrite`) goes through `util.fs.atomic_dir`: the old run is deleted only
once the new one is in place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tinyllm.pipeline.recipe import RecipeError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

STATE = "state.json"
RECIPE = "recipe.yaml"
STAGE_KEYS = {"index", "type", "kind", "dir", "seconds", "weights_bytes", "eval"}


class RunLockedError(RecipeError):
    """Another process is running into the same run directory."""


class CorruptStateError(RecipeError):
    """A run directory's state.json cannot be read back."""


def lock_path(out: Path) -> Path:
    """`.NAME.lock` beside the run directory NAME (symlinks resolved: one lock per directory)."""
    real = Path(out).resolve()
    return real.parent / f".{real.name}.lock"


def _holder(fd: int) -> str:
    """' (PID n)' from the lock file, where the holder wrote it."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f" (PID {pid})"
    return ""


@contextlib.contextmanager
def locked(out: Path) -> Iterator[Path]:
    """Hold the run directory `out` exclusively for the block; a second holder fails at once."""
    path = lock_path(out)
    if fcntl is None:
        log.warning("no flock on this platform: %s is not locked against a second run", out)
        yield path
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise RecipeError(
            f"cannot write the lock file {path} ({exc.strerror}); choose another -o DIR"
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"{out} is in use by another tinyllm run{_holder(fd)}; wait for it to finish "
                "(or stop it), or run into another -o DIR"
            ) from None
        except OSError as exc:
            raise RecipeError(
                f"cannot lock {path} ({exc.strerror}); put the run on a local file system"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
        os.ftruncate(fd, 0)  # no stale PID once the run is over
    finally:
        os.close(fd)  # releases the lock


def is_run_dir(path: Path) -> bool:
    """A directory `tinyllm run` wrote: it holds both recipe.yaml and state.json."""
    return (path / STATE).is_file() and (path / RECIPE).is_file()


def _corrupt(out: Path, why: str) -> CorruptStateError:
    return CorruptStateError(
        f"{out / STATE} is corrupt ({why}), so this run cannot continue from it. Start it over "
        f"with --overwrite (finished stages are computed again), or run into another -o DIR"
    )


def _shape_problem(state: Any) -> str | None:
    """What is missing or of the wrong type in a parsed state.json (None: nothing)."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__} instead of an object"
    expected = {"recipe": dict, "source": str, "versions": dict, "stages": list, "exports": list}
    for key, kind in {**expected, "finished": bool}.items():
        if not isinstance(state.get(key), kind):
            return f"'{key}' missing or not of type {kind.__name__}"
    original = state.get("original")
    if original is not None and not (
        isinstance(original, dict) and isinstance(original.get("eval"), dict)
    ):
        return "'original' is not an object with 'eval'"
    for i, record in enumerate(state["stages"], 1):
        missing = STAGE_KEYS - set(record) if isinstance(record, dict) else STAGE_KEYS
        if missing or not isinstance(record["eval"], dict):
            return f"stage record {i} lacks {', '.join(sorted(missing)) or 'a valid eval'}"
    return None


def read_state(out: Path) -> dict:
    """The parsed and checked state.json of run directory `out`."""
    path = Path(out) / STATE
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{out} is not a tinyllm run directory (no {STATE})") from None
    except OSError as exc:
        raise RecipeError(f"cannot read {path} ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise _corrupt(Path(out), f"not UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise _corrupt(Path(out), f"{exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    except RecursionError as exc:
        raise _corrupt(Path(out), "nested too deeply") from exc
    problem = _shape_problem(state)
    if problem:
        raise _corrupt(Path(out), problem)
    return state
