"""The tinyllm runtime's forward (its packed INT4/INT8 kernels) as a `LanguageModel`.

`RuntimeLM` runs the lean forward (`runtime.model.LeanRuntime`) on a flat batch of prompts,
each a prefill chunk over a paged KV cache of its own, and asks for the logits of every position
a request reads (`FlatBatch.logit_rows`), so tasks score the numbers the engine would serve.
Families the lean forward does not run (`unsupported_reason`) are refused: the engine runs them
on the transformers model itself, which `eval.lm.ModuleLM` already scores.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tinyllm.errors import ConfigError
from tinyllm.eval.lm import LOGITS_BYTES, LogitsLM
from tinyllm.runtime.kv_cache import PagedKVCache
from tinyllm.runtime.model import BatchItem, FlatBatch, LeanRuntime, flat_batch, unsupported_reason

BLOCK = 16  # KV cache block size (tokens)


class RuntimeLM(LogitsLM):
    """A model `tinyllm.load` returns, run by the runtime's lean forward (on its device)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        name: str = "runtime",
        int8_act: bool = False,
        kv_dtype: torch.dtype = torch.float32,
    ) -> None:
        """`kv_dtype`: the KV pool's precision (float32: exact; float16 or int8 as the engine's
        --kv-dtype), so a score includes what the cache's rounding costs."""
        super().__init__(name, tokenizer)
        reason = unsupported_reason(model)
        if reason:
            raise ConfigError(
                f"the runtime's lean forward does not run this model ({reason}); the engine "
                "serves it through transformers, which `tinyllm eval` scores directly"
            )
        self.runtime = LeanRuntime(model.eval(), int8_act)
        self.kv_dtype = kv_dtype
        self.tokens_per_batch = max(64, min(2048, LOGITS_BYTES // (4 * self.runtime.vocab)))

    def tail_logits(self, seqs: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        blocks = sum(-(-len(s) // BLOCK) for s in seqs)
        shape = self.runtime.cache_shape(self.kv_dtype)
        cache = PagedKVCache(shape, blocks, BLOCK, self.runtime.device)
        batch = self._batch(cache, seqs, starts)
        logits = self.runtime.forward(batch, cache).float().cpu()  # [sum of tails, V]
        return list(logits.split([len(s) - st for s, st in zip(seqs, starts, strict=True)]))

    def _batch(self, cache: PagedKVCache, seqs: list[list[int]], starts: list[int]) -> FlatBatch:
        """Every sequence as one chunk from position 0; logits from its start on."""
        items = []
        for sid, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
            cache.add(sid)
            items.append(BatchItem(sid, seq, 0, cache.reserve(sid, len(seq)), len(seq) - start))
        return flat_batch(items, cache, self.runtime)
