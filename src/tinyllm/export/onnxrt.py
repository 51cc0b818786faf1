"""Run an exported ONNX decoder in onnxruntime: logits, perplexity, greedy generation with the
KV cache the graph returns, and `OnnxLM`, the file as a `LanguageModel`. Used by the export
tests, the benchmarks and the recipe runner (which scores its exported files)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyllm.eval.lm import LOGITS_BYTES, LogitsLM, eot_id


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


class OnnxLM(LogitsLM):
    """An exported ONNX decoder as a `LanguageModel`. The graph takes no attention mask, so the
    sequences of a batch are run in groups of equal length; generation is greedy through the KV
    cache the graph returns, one sequence at a time."""

    def __init__(
        self, path: Path, tokenizer: Any, name: str | None = None, threads: int | None = None
    ) -> None:
        super().__init__(name or f"{Path(path).name} (onnxruntime)", tokenizer)
        self.sess = open_onnx(Path(path), threads)
        vocab = self.sess.get_outputs()[0].shape[-1]
        vocab = vocab if isinstance(vocab, int) else len(tokenizer)
        self.tokens_per_batch = max(64, min(2048, LOGITS_BYTES // (4 * vocab)))

    def tail_logits(self, seqs: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, seq in enumerate(seqs):
            by_length[len(seq)].append(i)
        out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        for group in by_length.values():
            z = run(self.sess, np.array([seqs[i] for i in group]))[0]  # [B, L, V]
            for r, i in enumerate(group):
                out[i] = torch.from_numpy(np.ascontiguousarray(z[r, starts[i] :]))
        return out

    def generate(self, requests: Sequence[tuple[list[int], int]]) -> list[list[int]]:
        """Greedy, cached, up to n new ids each, ending at the end-of-text id."""
        eot = eot_id(self.tokenizer)
        out: list[list[int]] = []
        for ctx, n in requests:
            new: list[int] = []
            z, keys, values = run(self.sess, np.array([ctx]))
            while len(new) < n:
                new.append(int(z[0, -1].argmax()))
                if new[-1] == eot or len(new) == n:
                    break
                z, keys, values = run(self.sess, np.array([[new[-1]]]), keys, values)
            out.append(new)
        return out
