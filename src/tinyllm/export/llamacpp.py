"""Run an exported GGUF file in llama.cpp itself (through llama-cpp-python) to check it.

Optional: `pip install llama-cpp-python`. Used by the export tests and benchmarks to score the
file the way llama.cpp computes it: its own logits, our evaluation windows and NLL formula.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyllm.errors import ConfigError


def open_gguf(path: Path, n_ctx: int = 512, threads: int | None = None) -> Any:
    """A llama.cpp model with logits for every position."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(
            "llama.cpp checks need llama-cpp-python: pip install llama-cpp-python"
        ) from exc
    return llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        verbose=False,
        n_threads=threads or torch.get_num_threads(),
    )


def logits(llm: Any, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of one sequence. -> float32 [len(ids), vocab]"""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _row_nll(z: torch.Tensor, row: list[int]) -> float:
    """Summed next-token NLL of one window from its logits z [seq - 1, vocab]."""
    z = z.double()
    target = torch.tensor(row[1:])
    return float((z.logsumexp(-1) - z.gather(1, target[:, None])[:, 0]).sum())


def nll_sum(llm: Any, windows: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over windows [n, seq] and the token count."""
    total, count = 0.0, 0
    for row in windows.tolist():
        total += _row_nll(torch.from_numpy(logits(llm, row))[:-1], row)
        count += len(row) - 1
    return total, count


def perplexity(llm: Any, windows: torch.Tensor) -> float:
    total, count = nll_sum(llm, windows)
    return math.exp(total / count)


@torch.no_grad()
def score(llm: Any, windows: torch.Tensor, reference: torch.nn.Module) -> dict[str, float]:
    """llama.cpp's perplexity, and its KL divergence from and top-1 agreement with `reference`
    (a tinyllm/transformers model, usually the FP32 original) at the same positions, with the
    formulas `tinyllm eval` uses. -> {"perplexity", "kld", "top1_agreement"}
    """
    from tinyllm.eval.divergence import token_kl, top1_agree

    reference.eval()
    total, kl, agree, count = 0.0, 0.0, 0, 0
    for row in windows.tolist():
        z = torch.from_numpy(logits(llm, row))[:-1]  # [seq - 1, vocab] predicts row[1:]
        ref = reference(input_ids=torch.tensor([row]), use_cache=False).logits[0, :-1]
        total += _row_nll(z, row)
        kl += float(token_kl(ref, z).double().sum())
        agree += int(top1_agree(ref, z).sum())
        count += len(row) - 1
    return {
        "perplexity": math.exp(total / count),
        "kld": kl / count,
        "top1_agreement": agree / count,
    }


def greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after the prompt ids (no stop on end-of-text)."""
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out
