"""Atomic file writes and the cache directory."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def cache_dir(*parts: str) -> Path:
    """`$TINYLLM_CACHE/<parts>` (default `~/.cache/tinyllm`), created on demand."""
    root = Path(os.environ.get("TINYLLM_CACHE", Path.home() / ".cache" / "tinyllm")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


OUTPUT_MARKER = ".tinyllm"  # written into every directory `atomic_dir` completes
RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux >= 3.15)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (or a directory's entries: the names created, renamed or
    removed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries."""
    if os.name != "nt":  # directories cannot be opened (nor need to be synced) on Windows
        fsync_file(path)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then every directory, deepest first."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it onto `target` only if the block succeeds.

    The file is flushed to disk before the rename and the directory after it, so a power loss
    leaves the old file or the complete new one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_file(Path(tmp))
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: Path, data: Any) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; it becomes `target` only if the block succeeds.

    The new directory is flushed to disk, then swapped with the old one in one atomic rename
    (Linux), or, where that is not available, the old one is renamed aside, the new one renamed
    in, and only then the old one deleted. At every instant `target` is the complete old or the
    complete new directory (or, on the fallback path, the old one waits beside it under
    `.name.old`, and the next `atomic_dir` or `recover_dir` on `target` puts it back). Leftover
    temporary directories of killed writers are removed by the next `atomic_dir` on `target`.
    The completed directory holds an empty `.tinyllm` marker: `--overwrite` replaces only
    directories that carry it (or a `tinyllm.json`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    )
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; an output gets the usual mode
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).touch()
        _fsync_tree(tmp)
        _replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """The process's umask (read by setting it, then putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_dir(new: Path, target: Path) -> None:
    """Put the complete directory `new` at `target`; the old `target` goes only afterwards."""
    with _locked(target.parent):
        _recover_locked(target)
        if not target.exists():
            os.rename(new, target)
            fsync_dir(target.parent)
            return
        if _exchange(new, target):
            old = new  # the swap left the old directory under the temporary name
        else:
            old = _aside(target)
            os.rename(target, old)
            os.rename(new, target)
        fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> bool:
    """Finish a replacement of `target` that a crash interrupted. -> True if the old directory
    was put back (the new one never arrived)."""
    target = Path(target)
    if not target.parent.is_dir():
        return False
    with _locked(target.parent):
        return _recover_locked(target)


def _recover_locked(target: Path) -> bool:
    _remove_stale_tmp(target)
    aside = _aside(target)
    if not aside.exists():
        return False
    if target.exists():  # the new one is in place; only the deletion of the old one was lost
        shutil.rmtree(aside, ignore_errors=True)
        return False
    os.rename(aside, target)
    fsync_dir(target.parent)
    log.warning("%s: an interrupted replacement was undone (the previous version is back)", target)
    return True


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _remove_stale_tmp(target: Path) -> None:
    """Delete temporary directories of `atomic_dir(target)` whose writer process is gone."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[a-z0-9_]+\.tmp")
    for entry in target.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and entry.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on `directory` (no-op where flock is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # NFS emulates flock with fcntl locks, refused on directories
            log.debug("no lock on %s (%s); replacing without it", directory, exc)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux renameat2). -> False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # kernel or filesystem without RENAME_EXCHANGE: use the fallback
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def file_fingerprint(path: Path) -> str:
    """A cheap identity for a file: resolved path, size and modification time."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_size(path: Path) -> int:
    """Total bytes of the regular files under `path` (or of `path` itself if it is a file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
