"""Run an exported GGUF file in llama.cpp itself (through llama-cpp-python) to check it.

Optional: `pip install llama-cpp-python`. Used by the export tests, the benchmarks and the recipe
runner to score the file the way llama.cpp computes it: its own logits, our evaluation windows and
NLL formula (`score`), and the evaluation's tasks through `LlamaCppLM`, a `LanguageModel`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyllm.errors import ConfigError
from tinyllm.eval.lm import LOGITS_BYTES, LogitsLM, eot_id


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


def trained_context(llm: Any) -> int:
    """The context length the model was trained for (the GGUF's ARCH.context_length)."""
    meta = llm.metadata
    key = f"{meta.get('general.architecture', 'llama')}.context_length"
    return int(meta[key]) if key in meta else int(llm._model.n_ctx_train())


def logits(llm: Any, ids: list[int], start: int = 0, reuse: bool = False) -> np.ndarray:
    """llama.cpp's logits for positions start.. of one sequence. The context is reset first, or
    with `reuse` rewound to the prefix `ids` shares with the sequence evaluated last (its KV cache
    and logits rows are those of the same tokens at the same positions), as llama.cpp's own
    generate does. -> float32 [len(ids) - start, vocab]"""
    if len(ids) > llm.n_ctx():
        raise ConfigError(
            f"{len(ids)} tokens do not fit llama.cpp's context of {llm.n_ctx()}: "
            "open the file with a larger n_ctx"
        )
    keep = _shared_prefix(llm, ids) if reuse else 0
    if keep:
        llm.n_tokens = keep  # eval() drops the KV cache from here on
    else:
        llm.reset()
    llm.eval(ids[keep:])
    return np.array(llm.scores[start : len(ids)], dtype=np.float32)


def _shared_prefix(llm: Any, ids: list[int]) -> int:
    """How many leading ids are cached already (at most all but the last, which is evaluated
    again; none for recurrent models, whose state cannot be rewound)."""
    if getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False):
        return 0
    n = min(llm.n_tokens, len(ids) - 1)
    same = llm.input_ids[:n] == np.asarray(ids[:n])
    return n if same.all() else int(same.argmin())


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


class LlamaCppLM(LogitsLM):
    """A GGUF file as a `LanguageModel`: llama.cpp's own logits, one sequence at a time (each
    rewound to the prefix it shares with the one before, else reset: the choices of a question
    evaluate their context once); greedy generation by llama.cpp's greedy sampler.

    The context grows (the file is opened again, in powers of two) when a sequence is longer
    than it, up to the length the model was trained for; longer is a ConfigError."""

    def __init__(
        self,
        path: Path,
        tokenizer: Any,
        name: str | None = None,
        threads: int | None = None,
        n_ctx: int = 256,
    ) -> None:
        super().__init__(name or f"{Path(path).name} (llama.cpp)", tokenizer)
        self.path, self.threads = Path(path), threads
        self.llm = open_gguf(self.path, n_ctx, threads)  # grows as sequences need
        self.tokens_per_batch = max(64, min(2048, LOGITS_BYTES // (4 * self.llm.n_vocab())))

    def _fit(self, n: int) -> None:
        """A context of at least n tokens (llama-cpp-python's own arrays hold the n_ctx asked
        for; llama.cpp may round its context up)."""
        if n <= len(self.llm.input_ids):
            return
        limit = trained_context(self.llm)
        if n > limit:
            raise ConfigError(
                f"a sequence of {n} tokens is longer than {self.path.name} was trained for "
                f"({limit}); lower the evaluation's seq_len or the task's few-shot examples"
            )
        self.llm.close()
        self.llm = open_gguf(self.path, min(limit, 1 << (n - 1).bit_length()), self.threads)

    def tail_logits(self, seqs: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        """In sorted order, so the choices of a question follow each other and each reuses the
        context its predecessor left in llama.cpp's cache."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        for i in sorted(range(len(seqs)), key=seqs.__getitem__):
            self._fit(len(seqs[i]))  # a file opened again starts empty
            out[i] = torch.from_numpy(logits(self.llm, seqs[i], starts[i], reuse=True))
        return out

    def generate(self, requests: Sequence[tuple[list[int], int]]) -> list[list[int]]:
        """Greedy by llama.cpp's sampler (temperature 0: the argmax of its logits), up to n new
        ids, ending at the end-of-text id."""
        eot = eot_id(self.tokenizer)
        out: list[list[int]] = []
        for ctx, n in requests:
            self._fit(len(ctx) + n)
            new: list[int] = []
            for token in self.llm.generate(ctx, top_k=1, temp=0.0, reset=True) if n else ():
                new.append(int(token))
                if len(new) == n or new[-1] == eot:
                    break
            out.append(new)
        return out
