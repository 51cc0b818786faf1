"""A draft model for speculative decoding: a smaller model with the target's tokenizer (a
layer-dropped or pruned student, a lower-bit copy) proposes k tokens for each decoding sequence,
greedily, and the engine's target verifies them in one forward (Engine._accept).

The draft keeps its own paged KV cache, with as many blocks as the target's pool (so as many
tokens; its bytes are the draft's per token: a layer-dropped draft's pool is smaller). Per
sequence it remembers which tokens it holds keys for: the sequence's tokens up to the last
verification plus the draft tokens it fed itself. Before each proposal it keeps the longest
prefix of those that the sequence still agrees with (rejected draft tokens are truncated away)
and feeds what is new (the prompt the first time, in chunks of at most CATCH_UP tokens, then the
one or two tokens verification added). So a draft of k tokens costs k forwards of the draft
model, batched over every drafting sequence.

A draft that cannot run (its pool is full, a forward fails) proposes nothing: the engine
decodes plainly, so output never depends on the draft, only speed does.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tinyllm.errors import ConfigError
from tinyllm.runtime.kv_cache import OutOfBlocks, PagedKVCache
from tinyllm.runtime.model import BatchItem, LeanRuntime, flat_batch, unsupported_reason

log = logging.getLogger(__name__)
CATCH_UP = 512  # prompt tokens a sequence feeds the draft per step, at most


class DraftModel:
    def __init__(
        self,
        model: nn.Module,
        vocab: int,
        kv_dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        int8_act: bool = False,
    ) -> None:
        reason = unsupported_reason(model)
        if reason:
            raise ConfigError(f"a draft model must run on the lean runtime, and {reason}")
        self.runtime = LeanRuntime(model, int8_act, static=True)
        shape = self.runtime.cache_shape(kv_dtype)  # as many tokens as the target's pool holds
        self.cache = PagedKVCache(shape, num_blocks, block_size, device)
        self.vocab = vocab  # the target's: a wider draft head never proposes beyond it
        self.fed: dict[int, list[int]] = {}  # per sequence: the tokens whose keys are cached
        self.dropped: set[int] = set()  # sequences the pool could not hold: no more drafts

    def release(self, seq_id: int) -> None:
        """Forget a sequence (finished or preempted: the engine calls this)."""
        self.cache.release(seq_id)
        self.fed.pop(seq_id, None)
        self.dropped.discard(seq_id)

    def propose(self, wants: dict[int, tuple[list[int], int]]) -> dict[int, list[int]]:
        """{sequence id: (its tokens, k)} -> {sequence id: up to k greedy draft tokens}."""
        wants = {sid: w for sid, w in wants.items() if sid not in self.dropped}
        feed = {sid: self._sync(sid, ids) for sid, (ids, _) in wants.items()}
        drafts: dict[int, list[int]] = {sid: [] for sid in wants}
        while feed:
            items = self._items(feed)
            if not items:
                break
            batch = flat_batch(items, self.cache, self.runtime)
            batch.argmax_only = True  # greedy proposals
            logits = self.runtime.forward(batch, self.cache)
            ready = [it.seq_id for it in items if it.logits]
            picks = logits[:, : self.vocab].float().argmax(-1).tolist()
            feed = {}
            for sid, token in zip(ready, picks, strict=True):
                drafts[sid].append(token)
                if len(drafts[sid]) < wants[sid][1]:
                    feed[sid] = [token]
        return drafts

    def _sync(self, sid: int, ids: list[int]) -> list[int]:
        """Drop the cached keys the sequence no longer agrees with; -> the tokens to feed."""
        fed = self.fed.get(sid)
        if fed is None:  # new: share cached prompt blocks with earlier sequences
            fed = self.fed[sid] = ids[: self.cache.add(sid, ids)]
        keep = min(len(fed), len(ids) - 1)  # the last token is fed again for its logits
        if fed[:keep] != ids[:keep]:
            keep = next(i for i, (a, b) in enumerate(zip(fed, ids, strict=False)) if a != b)
        if keep < len(fed):
            self.cache.truncate(sid, keep)
            del fed[keep:]
        return ids[keep:]

    def _items(self, feed: dict[int, list[int]]) -> list[BatchItem]:
        """This forward's share of every sequence (a long catch-up in chunks, no logits until
        its last); a sequence the pool cannot hold is dropped (it drafts nothing)."""
        items = []
        for sid, tokens in feed.items():
            chunk = tokens[:CATCH_UP]
            try:
                slots = self.cache.reserve(sid, len(chunk))
            except OutOfBlocks:
                log.info("draft KV pool full: sequence %d decodes without drafts", sid)
                self.release(sid)
                self.dropped.add(sid)
                continue
            last = int(len(chunk) == len(tokens))  # logits once the whole catch-up is in
            items.append(BatchItem(sid, chunk, len(self.fed[sid]), slots, last))
            self.fed[sid].extend(chunk)
        return items
