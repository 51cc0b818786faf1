"""Atomic files and directories: the old version is never deleted before the new one is in place."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllm.util import fs


def _write(d: Path, text: str) -> None:
    (d / "a.txt").write_text(text)
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_text(text * 2)


def _read(d: Path) -> tuple[str, str]:
    return (d / "a.txt").read_text(), (d / "sub" / "b.txt").read_text()


@pytest.fixture(params=["exchange", "fallback"])
def swap(request, monkeypatch) -> str:
    """Run each test with the atomic swap (Linux renameat2) and with the rename-aside fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    elif fs._renameat2() is None:
        pytest.skip("renameat2 is not available here")
    return request.param


def test_replace_keeps_only_the_new_directory(tmp_path: Path, swap: str):
    target = tmp_path / "out"
    with fs.atomic_dir(target) as tmp:
        _write(tmp, "old")
    with fs.atomic_dir(target) as tmp:
        _write(tmp, "new")
    assert _read(target) == ("new", "newnew")
    assert (target / fs.OUTPUT_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or aside left


def test_failure_inside_the_block_keeps_the_old_directory(tmp_path: Path, swap: str):
    target = tmp_path / "out"
    with fs.atomic_dir(target) as tmp:
        _write(tmp, "old")
    with pytest.raises(RuntimeError), fs.atomic_dir(target) as tmp:
        _write(tmp, "new")
        raise RuntimeError("killed halfway")
    assert _read(target) == ("old", "oldold")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_crash_between_the_renames_is_recovered(tmp_path: Path):
    """Fallback path: old renamed aside, the process died before the new one came in."""
    target = tmp_path / "out"
    with fs.atomic_dir(target) as tmp:
        _write(tmp, "old")
    os.rename(target, fs._aside(target))
    assert not target.exists()
    assert fs.recover_dir(target) is True
    assert _read(target) == ("old", "oldold")
    assert not fs._aside(target).exists()


def test_crash_before_the_old_copy_was_deleted(tmp_path: Path):
    """Fallback path: the new one is in place, the old one still lies aside."""
    target = tmp_path / "out"
    aside = fs._aside(target)
    aside.mkdir()
    _write(aside, "old")
    target.mkdir()
    _write(target, "new")
    with fs.atomic_dir(target) as tmp:  # the next writer cleans up first
        _write(tmp, "newer")
    assert _read(target) == ("newer", "newernewer")
    assert not aside.exists()


def test_temp_dirs_of_dead_writers_are_removed(tmp_path: Path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    stale = tmp_path / f".out.{pid}.abc123_x.tmp"
    live = tmp_path / f".out.{os.getpid()}.zzz.tmp"
    other = tmp_path / f".out.b.{pid}.abc.tmp"  # belongs to target 'out.b'
    for d in (stale, live, other):
        d.mkdir()
    with fs.atomic_dir(tmp_path / "out") as tmp:
        _write(tmp, "x")
    assert not stale.exists()
    assert live.exists() and other.exists()


def test_atomic_path_flushes_file_and_directory(tmp_path: Path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    monkeypatch.setattr(fs.os, "fsync", spy)
    target = tmp_path / "f.json"
    fs.write_json_atomic(target, {"a": 1})
    assert any(Path(s).name.startswith(".f.json.") for s in synced)  # the file, before rename
    assert str(tmp_path) in synced  # the directory, after it


def test_atomic_dir_flushes_every_file(tmp_path: Path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(
        fs.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))
    )
    with fs.atomic_dir(tmp_path / "out") as tmp:
        _write(tmp, "x")
    names = {Path(s).name for s in synced}
    assert {"a.txt", "b.txt", "sub", fs.OUTPUT_MARKER}.issubset(names)
    assert str(tmp_path) in synced


def _die_at(step: int) -> None:
    """In a forked child: exit on the spot (no cleanup, like SIGKILL) at the `step`-th file system
    operation of a directory replacement."""
    calls = [0]

    def wrap(fn):
        def dying(*args, **kwargs):
            if calls[0] == step:
                os._exit(0)
            calls[0] += 1
            return fn(*args, **kwargs)

        return dying

    fs.os.rename = wrap(os.rename)
    fs.os.replace = wrap(os.replace)
    fs.shutil.rmtree = wrap(shutil.rmtree)
    fs.fsync_dir = wrap(fs.fsync_dir)
    fs._exchange = wrap(fs._exchange)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_death_at_every_step_of_a_replace(tmp_path: Path, swap: str):
    """A writer dying before any one of the renames, syncs and deletions of a replacement leaves
    the complete old or the complete new directory (after `recover_dir` on the fallback path)."""
    outcomes = []
    for step in range(8):
        target = tmp_path / f"out{step}"
        with fs.atomic_dir(target) as tmp:
            _write(tmp, "old")
        pid = os.fork()
        if pid == 0:
            _die_at(step)
            with fs.atomic_dir(target) as tmp:
                _write(tmp, "new")
            os._exit(0)
        os.waitpid(pid, 0)
        fs.recover_dir(target)
        outcomes.append(_read(target)[0])
        with fs.atomic_dir(target) as tmp:  # the next writer leaves no debris behind
            _write(tmp, "next")
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".out{step}")) == []
    assert set(outcomes) == {"old", "new"}, outcomes  # both sides of the swap were reached


def test_a_completed_directory_gets_the_usual_mode_not_mkdtemps_0700(tmp_path) -> None:
    import os

    from tinyllm.util.fs import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
