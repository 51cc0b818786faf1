"""Resuming a streamed compression that was interrupted.

A streamed run (core/stream.py) writes each compressed block to its work directory
(`<out>.stream0`). After each block it also records, atomically, what a restart needs to go on
exactly where it stopped: which blocks are done and where their files are, the step's report so
far, and the calibration activations the next block receives (the finished blocks' outputs), in
`activations.safetensors` beside `journal.json`. `tinyllm quantize ... --stream on --resume`
with the same source, settings and calibration windows (their digest is checked) reads them
back, skips the finished blocks and continues with the next one: the result is the one an
uninterrupted run writes, byte for byte.

Only a run of one step whose method makes a single pass over the blocks and keeps nothing
across blocks but its report resumes (RESUMABLE); anything else restarts from block 0.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tinyllm.errors import ConfigError
from tinyllm.util.fs import write_json_atomic

# methods whose only state across blocks is their report (each block is compressed from its
# own calibration inputs); smoothquant's model-wide alpha and OWL's ratios are not
RESUMABLE = frozenset({"gptq", "awq", "rtn", "nf4"})
JOURNAL = "journal.json"
ACTIVATIONS = "activations.safetensors"


def fingerprint(how: list[Any], steps: list[Any], windows: torch.Tensor | None) -> str:
    """Digest of what decides a run's result: `how` (the source, the batch size, the
    calibration forwards' dtype, the device), the steps' settings and the calibration token
    ids."""
    h = hashlib.sha256()
    h.update(
        json.dumps([[str(x) for x in how], [s.model_dump(mode="json") for s in steps]]).encode()
    )
    if windows is not None:
        h.update(windows.contiguous().numpy().tobytes())
    return h.hexdigest()


class Journal:
    """The progress record of one streamed run in its work directory."""

    def __init__(self, workdir: Path, digest: str) -> None:
        self.workdir, self.digest = Path(workdir), digest
        self.state: dict[str, Any] | None = None  # what resume() found

    def load(self) -> dict[str, Any] | None:
        """The recorded progress, or None when there is none; a record made by another run
        (other source, settings or calibration) is a ConfigError."""
        path = self.workdir / JOURNAL
        if not path.is_file() or not (self.workdir / ACTIVATIONS).is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} is unreadable ({exc}); rerun without --resume") from exc
        if state.get("fingerprint") != self.digest:
            raise ConfigError(
                f"the interrupted run in {self.workdir} had another source, other settings or "
                "other calibration windows; rerun it with those, or without --resume to start over"
            )
        self.state = state
        return state

    def save(
        self,
        pass_index: int,
        done: int,
        stored: dict[int, tuple[Path, dict, dict]],
        report: dict[str, Any],
        xs: list[torch.Tensor] | None,
        ref: list[torch.Tensor] | None,
    ) -> None:
        """Record that blocks 0..done-1 of pass `pass_index` are finished, with the inputs of
        block `done` (activations first, then the journal: a crash between the two leaves the
        previous, consistent record)."""
        tensors = {f"x.{b}": x.detach().cpu().contiguous() for b, x in enumerate(xs or [])}
        tensors |= {f"ref.{b}": r.detach().cpu().contiguous() for b, r in enumerate(ref or [])}
        partial = self.workdir / (ACTIVATIONS + ".partial")
        save_file(tensors or {"empty": torch.zeros(0)}, str(partial))
        try:
            json.dumps(report)
        except (TypeError, ValueError):
            report = {}  # (every resumable method's report is JSON; a resumed run recounts)
        state = {
            "fingerprint": self.digest,
            "pass": pass_index,
            "done": done,
            "stored": {str(i): [str(f), q, s] for i, (f, q, s) in stored.items()},
            "report": report,
        }
        partial.replace(self.workdir / ACTIVATIONS)
        write_json_atomic(self.workdir / JOURNAL, state)

    def activations(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(xs, ref) as recorded: the inputs of the first unfinished block."""
        tensors = load_file(str(self.workdir / ACTIVATIONS))
        xs = [tensors[f"x.{b}"].to(device) for b in range(_count(tensors, "x."))]
        ref = [tensors[f"ref.{b}"].to(device) for b in range(_count(tensors, "ref."))]
        return xs, ref

    def stored(self) -> dict[int, tuple[Path, dict, dict]]:
        """The finished blocks' files and their checkpoint records, as Streaming keeps them."""
        assert self.state is not None
        return {
            int(i): (Path(f), q, {k: tuple(v) for k, v in s.items()})
            for i, (f, q, s) in self.state["stored"].items()
        }


def _count(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(1 for k in tensors if k.startswith(prefix))
