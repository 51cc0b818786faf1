"""Run directories under faults: a second concurrent run, a corrupt state.json, --overwrite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.pipeline.test_runner import recipe_text
from tests.test_cli import assert_clean_error, run
from tinyllm.pipeline.recipe import RecipeError, parse_recipe
from tinyllm.pipeline.rundir import CorruptStateError, RunLockedError, lock_path, locked
from tinyllm.pipeline.runner import prepare_output, run_recipe
from tinyllm.util import fs

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "200"}


# --- the lock -------------------------------------------------------------------------------------


def test_a_second_lock_fails_at_once_and_names_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (tmp_path / "link").symlink_to(out, target_is_directory=True)
    with locked(out):
        for path in (out, tmp_path / "link"):  # a second open file description, same process
            held = rf"in use by another tinyllm run \(PID {os.getpid()}\)"
            with pytest.raises(RunLockedError, match=held), locked(path):
                pass
    with locked(out):  # released on exit
        pass
    assert lock_path(out) == tmp_path / ".run.lock" and not out.exists()


def _hold_lock(out: Path) -> subprocess.Popen:
    code = textwrap.dedent(
        f"""
        import time
        from tinyllm.pipeline.rundir import locked
        with locked({str(out)!r}):
            print("locked", flush=True)
            time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=_env())
    assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
    return proc


def test_the_lock_dies_with_a_killed_process(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _hold_lock(out)
    try:
        with pytest.raises(RunLockedError, match=f"PID {proc.pid}"), locked(out):
            pass
    finally:
        proc.kill()  # SIGKILL: no cleanup code runs, the kernel drops the lock
        proc.wait()
    with locked(out):
        pass


def test_cli_refuses_a_directory_another_run_holds(tiny_dir, corpus_file, tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_dir, corpus_file, "  - {type: magnitude, sparsity: 0.5}\n"))
    out = tmp_path / "run"
    with locked(out):
        p = run("run", str(recipe), "-o", str(out))
        assert_clean_error(p, f"{out} is in use by another tinyllm run (PID {os.getpid()})")
        text = recipe.read_text()
        for resume, overwrite in ((True, False), (False, True)):
            with pytest.raises(RunLockedError):
                run_recipe(parse_recipe(text), text, out, resume=resume, overwrite=overwrite)
    assert not out.exists()


def test_two_concurrent_runs_the_second_fails_and_the_first_finishes(
    tiny_dir, corpus_file, tmp_path
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_dir, corpus_file, "  - {type: magnitude, sparsity: 0.5}\n"))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tinyllm.cli", "run", str(recipe), "-o", str(out)]
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if lock_path(out).is_file() and lock_path(out).read_text().strip():
            break
        time.sleep(0.01)
    assert lock_path(out).read_text().strip() == str(first.pid)
    first.send_signal(signal.SIGSTOP)  # hold the first run inside its run, deterministically
    try:
        second = run("run", str(recipe), "-o", str(out))
    finally:
        first.send_signal(signal.SIGCONT)
    assert_clean_error(second, f"is in use by another tinyllm run (PID {first.pid})")
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr.decode()
    state = json.loads((out / "state.json").read_text())
    assert state["finished"] and len(state["stages"]) == 1
    assert lock_path(out).read_text() == ""  # no stale PID after the run


def test_run_recipe_holds_the_lock_for_the_whole_run(tiny_dir, corpus_file, tmp_path) -> None:
    text = recipe_text(tiny_dir, corpus_file, "  - {type: magnitude, sparsity: 0.5}\n")
    out = tmp_path / "run"
    refused = []

    def on_stage(record: dict) -> None:
        with pytest.raises(RunLockedError) as info, locked(out):
            pass
        refused.append(str(info.value))

    run_recipe(parse_recipe(text), text, out, on_stage=on_stage)
    assert len(refused) == 1 and f"PID {os.getpid()}" in refused[0]
    with locked(out):
        pass
    # the finished run, damaged two ways, is refused on --resume with what to do
    (out / "stages" / "01-magnitude" / "model.safetensors").unlink()
    with pytest.raises(RecipeError, match="01-magnitude is missing; start the run over"):
        run_recipe(parse_recipe(text), text, out, resume=True)
    state = (out / "state.json").read_text()
    (out / "state.json").write_text(state[: len(state) // 2])
    with pytest.raises(CorruptStateError, match=r"state.json is corrupt .* --overwrite"):
        run_recipe(parse_recipe(text), text, out, resume=True)


# --- corrupt state.json ---------------------------------------------------------------------------


def _fake_run(out: Path, text: str, state: bytes | None = None) -> None:
    """A run directory as `tinyllm run` leaves it after its first stage, with a marker file."""
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text(text)
    if state is None:
        fields = {"recipe": parse_recipe(text).normalized(), **GOOD, "stages": []}
        state = json.dumps(fields).encode()
    (out / "state.json").write_bytes(state)
    (out / "stages" / "01-rtn").mkdir(parents=True)
    (out / "stages" / "01-rtn" / "marker").write_text("old run")


GOOD = {"source": "r.yaml", "versions": {}, "original": None, "exports": [], "finished": False}
OK = json.dumps(GOOD)[1:-1]  # its fields, to splice into a JSON object
CORRUPT = {
    "truncated": (b'{"recipe": {"model": "m", "stag', "Unterminated string"),
    "empty": (b"", "Expecting value at line 1, column 1"),
    "binary": (b"\x00\xff\xfe garbage", "not UTF-8 at byte 1"),
    "a list": (b"[]", "a list instead of an object"),
    "no stages": (f'{{"recipe": {{}}, {OK}}}'.encode(), "'stages' missing or not of type list"),
    "bad record": (
        f'{{"recipe": {{}}, "stages": [{{"index": 1, "eval": {{}}}}], {OK}}}'.encode(),
        "stage record 1 lacks dir, kind, seconds, type, weights_bytes",
    ),
    "bad original": (
        f'{{"recipe": {{}}, "stages": [], {OK}}}'.replace(
            '"original": null', '"original": 3'
        ).encode(),
        "'original' is not an object with 'eval'",
    ),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_state_is_a_clear_error_and_overwrite_recovers(case: str, tmp_path: Path) -> None:
    data, why = CORRUPT[case]
    text = "model: m\nstages: [{type: rtn}]\n"
    out = tmp_path / "run"
    _fake_run(out, text, data)
    with pytest.raises(CorruptStateError) as info:
        prepare_output(out, parse_recipe(text), text, resume=True, overwrite=False)
    msg = str(info.value)
    assert msg.startswith(f"{out / 'state.json'} is corrupt (") and why in msg, msg
    assert "Start it over with --overwrite" in msg
    state = prepare_output(out, parse_recipe(text), text, resume=False, overwrite=True)
    assert state["stages"] == [] and json.loads((out / "state.json").read_text()) == state
    assert not (out / "stages").exists()


def test_cli_corrupt_state_has_no_traceback(tiny_dir, corpus_file, tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_dir, corpus_file, "  - {type: rtn}\n"))
    out = tmp_path / "run"
    _fake_run(out, recipe.read_text(), b'{"recipe": ')
    p = run("run", str(recipe), "-o", str(out), "--resume")
    assert_clean_error(p, "state.json is corrupt (Expecting value at line 1, column 12)")
    assert "--overwrite" in p.stderr
    assert_clean_error(run("report", str(out)), "state.json is corrupt (Expecting value")


# --- --overwrite ----------------------------------------------------------------------------------


TEXT = "model: m\nstages: [{type: rtn}]\n"


def test_overwrite_refuses_what_is_not_a_run_directory(tmp_path: Path) -> None:
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    (mine / "state.json").write_text("{}")  # a state.json alone does not make a run directory
    with pytest.raises(RecipeError, match="thesis is not a tinyllm run directory"):
        prepare_output(mine, parse_recipe(TEXT), TEXT, resume=False, overwrite=True)
    assert (mine / "chapter1.tex").read_text() == "precious"
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(RecipeError, match="not a tinyllm run directory"):
        prepare_output(afile, parse_recipe(TEXT), TEXT, resume=False, overwrite=True)
    assert afile.read_text() == "x"


def _leftovers(parent: Path) -> list[str]:
    """Hidden entries beside the run directory `run` other than its lock file."""
    return sorted(
        p.name for p in parent.iterdir() if p.name.startswith(".run.") and p.suffix != ".lock"
    )


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_a_run_and_leaves_nothing_behind(
    exchange: bool, tmp_path: Path, monkeypatch
) -> None:
    if not exchange:  # file systems without renameat2: rename aside, then delete
        monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    out = tmp_path / "run"
    _fake_run(out, TEXT)
    (tmp_path / "link").symlink_to(out, target_is_directory=True)
    state = prepare_output(tmp_path / "link", parse_recipe(TEXT), TEXT, False, overwrite=True)
    assert not (out / "stages").exists() and (tmp_path / "link").is_symlink()
    assert json.loads((out / "state.json").read_text()) == state
    assert _leftovers(tmp_path) == []


def test_a_failure_while_starting_over_keeps_the_old_run(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    _fake_run(out, TEXT)
    before = (out / "state.json").read_bytes()

    def broken() -> dict:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tinyllm.pipeline.runner._versions", broken)
    with pytest.raises(RecipeError, match=r"cannot write the new run into .* \(No space left"):
        prepare_output(out, parse_recipe(TEXT), TEXT, resume=False, overwrite=True)
    assert (out / "state.json").read_bytes() == before
    assert (out / "stages" / "01-rtn" / "marker").read_text() == "old run"
    assert _leftovers(tmp_path) == []


KILL_AT = """
import os, signal, sys
from pathlib import Path
from tinyllm.util import fs
from tinyllm.pipeline.recipe import parse_recipe
from tinyllm.pipeline.runner import prepare_output

out, when = Path(sys.argv[1]), sys.argv[2]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
real_rename = os.rename
def rename_once(a, b):  # the fallback's second rename (new run into place) never happens
    os.rename = die
    real_rename(a, b)
if when == "swap":  # just before the atomic swap
    fs._exchange = die
elif when == "between":  # rename-aside fallback: old run set aside, new one not yet in place
    fs._exchange, os.rename = (lambda a, b: False), rename_once
else:  # just after the swap, before the old run is deleted
    fs.shutil.rmtree = die
text = "model: m\\nstages: [{type: rtn}]\\n"
prepare_output(out, parse_recipe(text), text, resume=False, overwrite=True)
"""


def _is_old(path: Path) -> bool:
    return (path / "stages" / "01-rtn" / "marker").is_file()


@pytest.mark.parametrize("when", ["swap", "between", "cleanup"])
def test_sigkill_during_overwrite_never_loses_both_runs(when: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _fake_run(out, TEXT)
    old_state = json.loads((out / "state.json").read_text())
    p = subprocess.run([sys.executable, "-c", KILL_AT, str(out), when], env=_env())
    assert p.returncode == -signal.SIGKILL
    old = [p.name for p in tmp_path.iterdir() if _is_old(p)]
    if when == "swap":
        assert old == ["run"]  # the old run is untouched
    elif when == "between":
        assert old == [".run.old"] and not out.exists()  # set aside, never deleted
        # the next run puts it back before anything else: here --resume continues it
        state = prepare_output(out, parse_recipe(TEXT), TEXT, resume=True, overwrite=False)
        assert state == old_state and _is_old(out)
    else:
        assert len(old) == 1 and old[0].startswith(".run.")  # the old run, hidden
        assert json.loads((out / "state.json").read_text())["stages"] == []  # the new run
    prepare_output(out, parse_recipe(TEXT), TEXT, resume=False, overwrite=True)
    assert not _is_old(out) and _leftovers(tmp_path) == []  # the next --overwrite sweeps up
