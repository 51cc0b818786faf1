"""The training log: rows kept in memory, written as CSV and JSON, and drawn as a loss curve."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tinyllm.util.fs import atomic_path, write_json_atomic, write_text_atomic

LOG_JSON, LOG_CSV, LOSS_PNG = "log.json", "log.csv", "loss.png"


class TrainLog:
    """Step rows (loss terms, lr, throughput) and evaluation rows (perplexity, KLD)."""

    def __init__(self, steps: list[dict] | None = None, evals: list[dict] | None = None) -> None:
        self.steps = steps or []
        self.evals = evals or []

    @classmethod
    def read(cls, directory: Path, upto: int) -> TrainLog:
        """The log of an earlier run, cut at step `upto` (its last checkpoint)."""
        path = Path(directory) / LOG_JSON
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(
            [r for r in data.get("steps", []) if r["step"] <= upto],
            [r for r in data.get("evals", []) if r["step"] <= upto],
        )

    def write(self, directory: Path) -> None:
        directory = Path(directory)
        write_json_atomic(directory / LOG_JSON, {"steps": self.steps, "evals": self.evals})
        evals = {r["step"]: r for r in self.evals}
        fields = list(self.steps[0]) if self.steps else ["step"]
        extra = [k for k in (self.evals[0] if self.evals else {}) if k != "step"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields + [f"eval_{k}" for k in extra])
        writer.writeheader()
        for row in self.steps:
            ev = evals.get(row["step"], {})
            writer.writerow({**row, **{f"eval_{k}": ev.get(k, "") for k in extra}})
        write_text_atomic(directory / LOG_CSV, buf.getvalue())
        if self.steps:
            self.plot(directory / LOSS_PNG)

    def plot(self, path: Path) -> None:
        """Loss terms per step (left) and evaluation perplexity (right)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
        steps = [r["step"] for r in self.steps]
        for key in ("loss", "kd", "task", "feature", "attention"):
            if key in self.steps[0]:
                ax.plot(steps, [r[key] for r in self.steps], label=key, linewidth=1)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
        ax.legend()
        if self.evals:
            bx.plot([r["step"] for r in self.evals], [r["perplexity"] for r in self.evals], "o-")
        bx.set(xlabel="step", ylabel="perplexity", title="evaluation perplexity")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
