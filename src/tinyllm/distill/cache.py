"""On-disk cache of the teacher's top-k logits per training window.

Four memory-mapped arrays under one directory: values (float16 [windows, T, k]), indices
(int32 [windows, T, k]), rest (float32 [windows, T]: the log of the teacher's probability
outside its top k, so KD keeps the tail's mass) and a filled flag per window. A window is marked
filled only after its values are flushed, so a killed run never leaves a half-written window
marked as done. The key of the directory covers the teacher's weights, the token grid, k and the
cache format, so a changed teacher or corpus never reads stale logits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinyllm.util.fs import cache_dir, write_json_atomic


def model_fingerprint(model: nn.Module) -> str:
    """A digest of a model's config and a checksum of every parameter."""
    h = hashlib.sha256(model.config.to_json_string().encode())
    for name, p in model.state_dict().items():
        t = p.detach().float()
        h.update(
            f"{name}:{tuple(t.shape)}:{float(t.sum()):.8e}:{float(t.abs().sum()):.8e}".encode()
        )
    return h.hexdigest()[:16]


FORMAT = "v2"  # v2 added `rest`; a cache of another format is never read


class TeacherCache:
    def __init__(self, root: Path, windows: int, seq_len: int, k: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        shape = (windows, seq_len, k)
        meta = root / "meta.json"
        mode = "r+" if meta.is_file() else "w+"
        self.values = np.lib.format.open_memmap(
            root / "values.npy", mode=mode, dtype=np.float16, shape=shape
        )
        self.indices = np.lib.format.open_memmap(
            root / "indices.npy", mode=mode, dtype=np.int32, shape=shape
        )
        self.rest = np.lib.format.open_memmap(
            root / "rest.npy", mode=mode, dtype=np.float32, shape=shape[:2]
        )
        self.filled = np.lib.format.open_memmap(
            root / "filled.npy", mode=mode, dtype=np.bool_, shape=(windows,)
        )
        if mode == "w+":
            self.filled[:] = False
            self.filled.flush()
            write_json_atomic(meta, {"windows": windows, "seq_len": seq_len, "k": k})
        self.k = k

    @classmethod
    def for_run(
        cls, teacher: nn.Module, grid: torch.Tensor, k: int, directory: Path | None = None
    ) -> TeacherCache:
        """The cache of this teacher on this window grid ([windows, T] token ids)."""
        digest = hashlib.sha256(grid.numpy().tobytes()).hexdigest()[:12]
        key = f"{model_fingerprint(teacher)}-{digest}-k{k}-{FORMAT}"
        root = (directory or cache_dir("teacher-logits")) / key
        return cls(root, grid.shape[0], grid.shape[1], k)

    def get(
        self, window_ids: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k (values, indices) [B, T, k] of these windows (grid rows) and `rest` [B, T], the
        log-probability of everything outside the top k; `compute(rows)` returns the teacher's
        logits [M, T, V] of the rows not cached yet."""
        ids = window_ids.tolist()
        missing = [w for w in ids if not self.filled[w]]
        if missing:
            logits = compute(torch.tensor(missing)).float()  # [M, T, V], on the teacher's device
            top = logits.topk(self.k, dim=-1)
            rest = log_rest(logits, top.indices).cpu()
            top_values, top_indices = top.values.cpu(), top.indices.cpu()
            for row, w in enumerate(missing):
                self.values[w] = top_values[row].numpy().astype(np.float16)
                self.indices[w] = top_indices[row].numpy().astype(np.int32)
                self.rest[w] = rest[row].numpy()
            for arr in (self.values, self.indices, self.rest):
                arr.flush()
            self.filled[missing] = True
            self.filled.flush()
        values = torch.from_numpy(np.asarray(self.values[ids], dtype=np.float32))
        indices = torch.from_numpy(np.asarray(self.indices[ids], dtype=np.int64))
        rest = torch.from_numpy(np.asarray(self.rest[ids], dtype=np.float32))
        return values, indices, rest

    def coverage(self) -> float:
        return float(self.filled.mean())


def log_rest(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log of the softmax mass outside `indices` [..., k] of `logits` [..., V]. -> [...]"""
    outside = logits.scatter(-1, indices, float("-inf"))
    return outside.logsumexp(-1) - logits.logsumexp(-1)
