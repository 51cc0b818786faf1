"""Run an exported ONNX decoder in onnxruntime: logits, perplexity, greedy generation with the
KV cache the graph returns. Used by the export tests and benchmarks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


def open_onnx(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _empty_cache(sess: Any, batch: int) -> np.ndarray:
    layers, _, kv, _, d = sess.get_inputs()[1].shape
    return np.zeros((layers, batch, kv, 0, d), dtype=np.float32)


def run(sess: Any, ids: np.ndarray, keys=None, values=None) -> tuple[np.ndarray, ...]:
    """One forward: ids [B, S] after the cached keys/values (None: no past)."""
    if keys is None:
        keys = values = _empty_cache(sess, ids.shape[0])
    feeds = {"input_ids": ids.astype(np.int64), "past_keys": keys, "past_values": values}
    return tuple(sess.run(["logits", "present_keys", "present_values"], feeds))


def logits(sess: Any, ids: list[int]) -> np.ndarray:
    return run(sess, np.array([ids]))[0][0]


def perplexity(sess: Any, windows: torch.Tensor, batch: int = 4) -> float:
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        chunk = windows[start : start + batch]
        z = torch.from_numpy(run(sess, chunk.numpy())[0])[:, :-1].double()  # [B, L-1, V]
        target = chunk[:, 1:]
        total += float((z.logsumexp(-1) - z.gather(-1, target[..., None])[..., 0]).sum())
        count += target.numel()
    return math.exp(total / count)


def greedy(sess: Any, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after the prompt, one cached step at a time."""
    out: list[int] = []
    z, keys, values = run(sess, np.array([ids]))
    for _ in range(n):
        token = int(z[0, -1].argmax())
        out.append(token)
        z, keys, values = run(sess, np.array([[token]]), keys, values)
    return out
