"""The engine: continuous batching over a paged KV cache.

Each `step()` (1) drops cancelled sequences and frees their blocks, (2) admits waiting requests
from the scheduler while the batch and the KV pool have room, (3) builds one flat batch under a
token budget: one token for every decoding sequence, then prompt chunks (chunked prefill, so a
long prompt never stalls the others for more than one chunk), (4) runs the model once, samples
where a sequence's known tokens are all computed, and streams the new text to each sequence's
sink. When the pool runs out mid-decode, the most recently admitted sequence is preempted: its
blocks are freed and it is requeued at the front to recompute later.

`EngineLoop` runs steps on a background thread for the server; `Engine.generate` runs a list of
prompts to completion in the calling thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tinyllm.errors import ConfigError
from tinyllm.runtime.draft import DraftModel
from tinyllm.runtime.kv_cache import OutOfBlocks, PagedKVCache
from tinyllm.runtime.metrics import Metrics
from tinyllm.runtime.model import (
    BatchItem,
    FlatBatch,
    HFRuntime,
    LeanRuntime,
    flat_batch,
    unsupported_reason,
)
from tinyllm.runtime.sampling import (
    NonFiniteLogits,
    SamplingParams,
    make_generator,
    sample_token,
    verify_draft,
)
from tinyllm.runtime.scheduler import Scheduler, SchedulerConfig
from tinyllm.util.device import module_device, resolve_device

log = logging.getLogger(__name__)
INTERNAL_ERROR = "internal error while generating (details are in the server log)"
KV_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int8": torch.int8}


@dataclass
class EngineConfig:
    kv_memory_mb: float = 256.0  # the KV pool, preallocated
    # or "float32" (exact: what transformers keeps), or "int8" (a scale per token and head)
    kv_dtype: str = "float16"
    int8_activations: bool = False  # 4-bit layers on int8 x int4 integer kernels (not exact)
    block_size: int = 16
    token_budget: int = 512  # tokens per step over all sequences (decode + prefill chunks)
    # speculative decoding: a decoding sequence proposes up to this many tokens, the draft
    # model's greedy ones (Engine(draft=...)) or else by prompt lookup (what followed the latest
    # earlier occurrence of its last DRAFT_NGRAM tokens), verified in one forward; greedy output
    # is plain decoding's, sampled output is distributed as it. 0: off.
    speculate: int = 0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"  # auto, cpu, cuda[:N]: the model and the KV pool move there


@dataclass
class Event:
    """What a sink receives: a text delta (and token id), or the end of the sequence."""

    seq_id: int
    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    tenant: str = "default"
    sink: Callable[[Event], None] | None = None
    output: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose K/V are in the cache
    text: str = ""  # output text so far (cut before a stop string)
    decoded: str = ""  # every decoded token's text
    prefix_off: int = 0  # incremental detokenization offsets into output
    read_off: int = 0
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    token_times: list[float] = field(default_factory=list)
    generator: torch.Generator | None = None
    draft: list[int] = field(default_factory=list)  # tokens proposed for this step
    draft_misses: int = 0  # drafts rejected whole in a row; drafting pauses 2**misses steps
    draft_pause: int = 0

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.output

    @property
    def pending(self) -> int:
        return len(self.prompt) + len(self.output) - self.computed

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first per second between the first and the last (NaN below two)."""
        t = self.token_times
        return (len(t) - 1) / max(1e-9, t[-1] - t[0]) if len(t) > 1 else float("nan")


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: object,
        cfg: EngineConfig | None = None,
        draft: tuple[nn.Module, object] | None = None,
    ):
        """`draft`: (model, tokenizer) of a draft model for cfg.speculate (runtime.draft)."""
        self.cfg = cfg or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        self.device = _place(model, self.cfg)
        self.fallback = unsupported_reason(model)
        if self.fallback:
            if self.cfg.int8_activations:
                raise ConfigError(
                    f"int8 activations (--int8-act) need the lean runtime, and {self.fallback}: "
                    "drop --int8-act (this model runs on the transformers fallback)"
                )
            log.warning(
                "the lean runtime does not run this model (%s): falling back to the transformers "
                "model, one sequence at a time per step (slower; the paged cache only accounts)",
                self.fallback,
            )
            self.runtime: LeanRuntime | HFRuntime = HFRuntime(model)
        else:
            self.runtime = LeanRuntime(model, self.cfg.int8_activations, static=True)
        budget = int(self.cfg.kv_memory_mb * 2**20)
        if self.cfg.kv_dtype not in KV_DTYPES:
            raise ConfigError(
                f"KV cache dtype '{self.cfg.kv_dtype}' is not one of {', '.join(KV_DTYPES)}"
            )
        shape = self.runtime.cache_shape(KV_DTYPES[self.cfg.kv_dtype])
        self.cache = PagedKVCache.for_budget(shape, budget, self.cfg.block_size, self.device)
        self.scheduler = Scheduler(self.cfg.scheduler)
        self.metrics = Metrics()
        self.metrics.kv_blocks_total = self.cache.num_blocks
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._cancelled: set[int] = set()
        self.eos = _eos_ids(model, tokenizer)
        # one block of headroom: admission wants a free block beyond the prompt's, so a request
        # of the whole pool would wait forever
        pool_tokens = (self.cache.num_blocks - 1) * self.cache.block_size
        if pool_tokens < 1:
            raise ConfigError(
                f"the KV pool holds {self.cache.num_blocks} block(s); at least 2 are needed: "
                "raise --kv-memory"
            )
        self.max_context = min(self.runtime.max_positions, pool_tokens)
        self.vocab_size = int(getattr(model.config, "vocab_size", 0) or 0)
        self.drafter = None if draft is None else self._drafter(*draft)

    def _drafter(self, model: nn.Module, tokenizer: object) -> DraftModel:
        """The draft model on the engine's device, with a KV pool of the engine's budget."""
        if self.cfg.speculate <= 0:
            raise ConfigError("a draft model proposes cfg.speculate tokens: set it (--speculate)")
        if self.fallback:
            raise ConfigError(f"speculative decoding needs the lean runtime, and {self.fallback}")
        if _vocab(tokenizer) != _vocab(self.tokenizer):
            raise ConfigError(
                "the draft model's tokenizer differs from the model's: a draft must share its "
                "vocabulary (a pruned, layer-dropped or quantized copy of the same model)"
            )
        _place(model, self.cfg)
        dtype = KV_DTYPES[self.cfg.kv_dtype]
        bs, i8 = self.cfg.block_size, self.cfg.int8_activations
        blocks = self.cache.num_blocks  # the model's tokens, at the draft's bytes per token
        return DraftModel(model, self.vocab_size, dtype, blocks, bs, self.device, i8)

    # --- requests ---------------------------------------------------------------------------
    def prompt_ids(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt; with chat, wrapped in the tokenizer's chat template."""
        if not chat:
            return self.tokenizer.encode(text)
        return self.chat_ids([{"role": "user", "content": text}])

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template, ready to answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("this model's tokenizer has no chat template: send a plain prompt")
        wrapped = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer.encode(wrapped, add_special_tokens=False)

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ConfigError when a request can never run (empty, too long, ids out of the
        vocabulary)."""
        if not prompt:
            raise ConfigError("the prompt is empty: give at least one token")
        vocab = self.vocab_size
        if vocab and (bad := [t for t in params.logit_bias if t >= vocab]):
            raise ConfigError(
                f"logit_bias names token id {bad[0]}, outside this model's vocabulary "
                f"(ids 0 to {vocab - 1})"
            )
        total = len(prompt) + params.max_tokens
        if total > self.max_context:
            raise ConfigError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the context this engine can hold ({self.max_context} tokens)"
            )

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams | None = None,
        sink: Callable[[Event], None] | None = None,
        tenant: str = "default",
    ) -> Sequence:
        """Queue a request (thread safe). Raises ConfigError or scheduler.QueueFull."""
        params = params or SamplingParams()
        self.check_request(prompt, params)
        seq = Sequence(next(self._ids), list(prompt), params, tenant, sink)
        seq.generator = make_generator(params)
        with self._lock:
            self.scheduler.enqueue(tenant, seq)
            self.seqs[seq.id] = seq
            self.metrics.queue_depth(self._queue_depths())
        return seq

    def cancel(self, seq_id: int) -> None:
        """Stop a sequence (thread safe); its blocks are freed at the start of the next step."""
        with self._lock:
            self._cancelled.add(seq_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.running) or self.scheduler.waiting > 0 or bool(self._cancelled)

    # --- the step ---------------------------------------------------------------------------
    def step(self) -> int:
        """Run one batch; returns the number of tokens computed. Everything but the model's
        forward runs under the lock that submit() and cancel() take. A failure anywhere in the
        step ends the running sequences with an error (blocks freed); it never propagates."""
        try:
            return self._step()
        except Exception:
            log.exception("engine step failed outside the model forward")
            self.metrics.step_failures += 1
            with self._lock:
                for seq in list(self.running):
                    self._finish_safely(seq, "error", INTERNAL_ERROR)
            return 0

    def _step(self) -> int:
        with self._lock:
            self._drop_cancelled()
            self._admit()
            if not self.running:
                return 0
            wants = self._draft_requests()
        proposals = self._propose(wants)  # the draft model's forwards, outside the lock
        with self._lock:
            work = self._plan(proposals)
            batch = self._build(work)
            # only argmaxes are read: the runtime may verify an int8 head's maximum instead
            batch.argmax_only = all(w[0].params.plain_greedy for w in work)
        t0 = time.perf_counter()
        try:
            logits = self.runtime.forward(batch, self.cache)
        except Exception:  # a bug or OOM must not leave blocks held or sinks waiting
            log.exception("engine step failed in the model forward")
            self.metrics.step_failures += 1
            with self._lock:
                for seq in list(self.running):
                    self._finish_safely(seq, "error", INTERNAL_ERROR)
            return 0
        logits = logits.cpu()  # sampling and detokenizing run on the CPU (no copy there)
        dt = time.perf_counter() - t0
        tokens = sum(w[1] for w in work)
        decoding = any(w[1] == 1 or w[0].draft for w in work)
        with self._lock:
            self._sample(work, logits)
            if decoding:
                self.scheduler.observe_step(dt)
            self.metrics.step(dt, tokens, self.cache.used_blocks)
        return tokens

    def _drop_cancelled(self) -> None:
        for sid in self._cancelled:
            seq = self.seqs.get(sid)
            if seq is None or seq.finish_reason:
                continue
            if seq in self.running:
                self._finish(seq, "cancelled")
            elif self.scheduler.remove(seq.tenant, seq):
                seq.finish_reason = "cancelled"
                self.seqs.pop(seq.id, None)
                _emit(seq, Event(seq.id, finish_reason="cancelled"))
        self._cancelled.clear()

    def _admit(self) -> None:
        def fits(seq: Sequence) -> bool:  # the whole known sequence plus one block of room
            return self.cache.blocks_for(len(seq.ids)) + 1 <= self.cache.free_blocks

        while (picked := self.scheduler.next(fits)) is not None:
            _, seq = picked
            # the fallback keeps keys in per-sequence transformers caches: nothing to share
            seq.computed = self.cache.add(seq.id, None if self.fallback else seq.ids)
            self.metrics.prefix_hit(seq.computed)
            seq.admitted = seq.admitted or time.perf_counter()
            self.running.append(seq)
        self.metrics.queue_depth(self._queue_depths())

    def _plan(self, proposals: dict[int, list[int]]) -> list[tuple[Sequence, int, torch.Tensor]]:
        """(sequence, tokens to compute now, their cache slots): decoders first (with their
        drafts: the draft model's `proposals`, else prompt lookup), then prompt chunks, within
        the token budget. Preempts when the pool cannot hold a step."""
        budget = self.cfg.token_budget
        work: list[tuple[Sequence, int, torch.Tensor]] = []
        for seq in sorted(self.running, key=lambda s: s.pending != 1):
            if seq not in self.running:  # preempted to make room for one planned earlier
                continue
            n = min(seq.pending, budget)
            if n <= 0:
                break
            seq.draft = self._draft(seq, budget - 1, proposals) if n == 1 else []
            n += len(seq.draft)
            slots = self._reserve(seq, n, planned={id(w[0]) for w in work})
            if slots is not None:
                work.append((seq, n, slots))
                budget -= n
        return work

    def _draft_room(self, seq: Sequence) -> int:
        """Draft tokens a decoding sequence may propose now (0 while its drafting pauses)."""
        if self.fallback or seq.pending != 1 or seq.draft_pause > 0:
            return 0
        return min(self.cfg.speculate, seq.params.max_tokens - len(seq.output) - 1)

    def _draft_requests(self) -> dict[int, tuple[list[int], int]]:
        """What the draft model is asked this step: {sequence id: (its tokens, k)}."""
        if self.drafter is None:
            return {}
        ks = ((s, self._draft_room(s)) for s in self.running)
        return {s.id: (s.ids, k) for s, k in ks if k > 0}

    def _propose(self, wants: dict[int, tuple[list[int], int]]) -> dict[int, list[int]]:
        """The draft model's proposals; a failure costs only the drafts (logged, counted)."""
        if not wants:
            return {}
        try:
            return self.drafter.propose(wants)
        except Exception:
            log.exception("the draft model failed: decoding this step without drafts")
            self.metrics.step_failures += 1
            for sid in wants:
                self.drafter.release(sid)  # its cache state is unknown: start it again
            return {}

    def _draft(self, seq: Sequence, room: int, proposals: dict[int, list[int]]) -> list[int]:
        """Tokens to verify after a decoding sequence's next one, within `room` more tokens
        of this step and the tokens it may still generate."""
        if seq.draft_pause > 0:  # its recent drafts were rejected whole: decode plainly a while
            seq.draft_pause -= 1
            return []
        k = min(self._draft_room(seq), room)
        if k <= 0:
            return []
        if self.drafter is not None:
            return proposals.get(seq.id, [])[:k]
        return lookup_draft(seq.ids, k)

    def _reserve(self, seq: Sequence, n: int, planned: set[int]) -> torch.Tensor | None:
        """Slots for n tokens of seq, preempting the newest unplanned sequences (seq itself
        last) until they fit; None if seq itself had to go."""
        while True:
            try:
                return self.cache.reserve(seq.id, n)
            except OutOfBlocks:
                victims = [s for s in self.running if id(s) not in planned and s is not seq]
                victim = victims[-1] if victims else seq
                self._preempt(victim)
                if victim is seq:
                    return None

    def _preempt(self, seq: Sequence) -> None:
        log.info("KV pool full: preempting sequence %d (it will recompute)", seq.id)
        self.cache.release(seq.id)
        self.runtime.release(seq.id)
        if self.drafter is not None:
            self.drafter.release(seq.id)
        self.running.remove(seq)
        seq.computed, seq.draft = 0, []
        self.scheduler.finished(seq.tenant)
        self.scheduler.enqueue(seq.tenant, seq, front=True)
        self.metrics.preemptions += 1

    def _build(self, work: list[tuple[Sequence, int, torch.Tensor]]) -> FlatBatch:
        items = []
        for seq, n, slots in work:
            start = seq.computed
            # a draft: the next token's logits and each draft token's (to verify it)
            want = n if seq.draft else int(start + n == len(seq.ids))
            new = (seq.ids + seq.draft)[start : start + n]
            items.append(BatchItem(seq.id, new, start, slots, want))
            seq.computed += n
        return flat_batch(items, self.cache, self.runtime)

    def _sample(self, work: list[tuple[Sequence, int, torch.Tensor]], logits: torch.Tensor) -> None:
        """Tokens for every sequence whose known tokens are all computed (one logits row each,
        in work order; a sequence with a draft has one row more per draft token, _accept);
        plain greedy rows share one argmax. A failure here (NaN logits, a tokenizer or
        stop-string error) ends only the sequence it happened in."""
        now = time.perf_counter()
        ready, first, r = [], [], 0  # sequences that get tokens, and their first logits row
        for seq, _, _ in work:
            if seq.draft or seq.computed == len(seq.ids):
                ready.append(seq)
                first.append(r)
                r += 1 + len(seq.draft)
        plain = [i for i, s in enumerate(ready) if s.params.plain_greedy]
        argmax_rows = [first[i] + j for i in plain for j in range(1 + len(ready[i].draft))]
        greedy: dict[int, int] = {}  # logits row -> its argmax (plain greedy sequences)
        if argmax_rows:  # one pass: the argmax, and NaN/inf rows (every row: no copy)
            every = argmax_rows == list(range(logits.shape[0]))
            top, picks = self._argmax(logits if every else logits[argmax_rows])
            ok = [t < math.inf for t in top.tolist()]
            greedy = {r: t for r, t, g in zip(argmax_rows, picks.tolist(), ok, strict=True) if g}
        for i, seq in enumerate(ready):
            try:
                if seq.draft:
                    rows = logits[first[i] : first[i] + len(seq.draft) + 1]
                    picks = [greedy.get(first[i] + j) for j in range(len(seq.draft) + 1)]
                    self._accept(seq, picks if seq.params.plain_greedy else rows, now)
                    continue
                token = greedy.get(first[i])
                if token is None:
                    token = self._sample_one(seq, logits[first[i]])
                self._append(seq, token, now)
            except NonFiniteLogits:
                log.error("sequence %d: the model produced non-finite logits", seq.id)
                self.metrics.nonfinite_logits += 1
                self._finish_safely(seq, "error", "the model produced non-finite logits")
            except Exception:
                log.exception("sequence %d failed while sampling or detokenizing", seq.id)
                self._finish_safely(seq, "error", INTERNAL_ERROR)

    def _argmax(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Max and argmax of each row, into the runtime's workspace when it has one."""
        ws = getattr(self.runtime, "ws", None)
        if ws is None or logits.device.type != "cpu":
            return logits.max(-1)
        n = logits.shape[0]
        out = (ws.get("top", n, 1, logits.dtype)[:, 0], ws.get("argmax", n, 1, torch.long)[:, 0])
        return torch.max(logits, -1, out=out)

    def _accept(self, seq: Sequence, picks: list[int | None] | torch.Tensor, now: float) -> None:
        """Verify a draft. Plain greedy: picks[j] is the argmax after the next token and j
        draft tokens; the draft's longest prefix greedy decoding would have produced is kept,
        then greedy's own next token. Otherwise picks are the logits rows, and
        sampling.verify_draft keeps or replaces draft tokens so that the tokens are
        distributed as one-at-a-time sampling gives them. The keys of rejected draft tokens
        are dropped."""
        draft, seq.draft = seq.draft, []
        if isinstance(picks, torch.Tensor):
            tokens, fell_back = verify_draft(picks, draft, seq.params, seq.ids, seq.generator)
            self.metrics.sampling_fallbacks += int(fell_back)
        else:
            if any(p is None for p in picks):
                raise NonFiniteLogits
            a = 0
            while a < len(draft) and picks[a] == draft[a]:
                a += 1
            tokens = [*draft[:a], picks[a]]
        a = len(tokens) - 1  # draft tokens kept (each kept token is the draft's, in order)
        seq.draft_misses = 0 if a else min(seq.draft_misses + 1, MAX_DRAFT_MISSES)
        seq.draft_pause = 2**seq.draft_misses - 1 if seq.draft_misses else 0
        seq.computed -= len(draft) - a
        self.cache.truncate(seq.id, seq.computed)
        self.metrics.drafted(len(draft), a)
        for token in tokens:
            self._append(seq, token, now)
            if seq.finish_reason:
                return

    def _sample_one(self, seq: Sequence, row: torch.Tensor) -> int:
        p = seq.params.repetition_penalty
        seen = torch.tensor(seq.ids) if p != 1.0 else torch.empty(0, dtype=torch.long)
        token, fell_back = sample_token(row, seq.params, seen, seq.generator)
        if fell_back:
            self.metrics.sampling_fallbacks += 1
        return token

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        if seq.token_times:
            self.metrics.inter_token(now - seq.token_times[-1])
        else:
            self.metrics.first_token(now - seq.arrival)
        seq.token_times.append(now)
        seq.output.append(token)
        self.scheduler.charge(seq.tenant, 1)
        self.metrics.tokens_generated += 1
        if token in self.eos and not seq.params.ignore_eos:
            self._finish(seq, "stop", drop_last=True)
            return
        stopped = self._stream(seq, token)
        if stopped:
            self._finish(seq, "stop")
        elif len(seq.output) >= seq.params.max_tokens:
            self._finish(seq, "length")

    def _stream(self, seq: Sequence, token: int) -> bool:
        """Send the new text; True if a stop string ended the sequence.

        Incremental detokenization: only the tokens since the last emitted text are decoded,
        with the one before them as context (so leading spaces and merges come out right)."""
        ids = seq.output
        prefix = self.tokenizer.decode(ids[seq.prefix_off : seq.read_off], skip_special_tokens=True)
        window = self.tokenizer.decode(ids[seq.prefix_off :], skip_special_tokens=True)
        if window.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            return False
        seq.decoded += window[len(prefix) :]
        seq.prefix_off, seq.read_off = seq.read_off, len(ids)
        text = seq.decoded
        stops = seq.params.stop
        cut = min(
            (i for s in stops if (i := text.find(s, max(0, seq.sent - len(s)))) >= 0), default=-1
        )
        if cut >= 0:
            text = text[:cut]
        hold = 0 if cut >= 0 else max((len(s) - 1 for s in stops), default=0)
        seq.text = text
        upto = max(seq.sent, len(text) - hold)
        if upto > seq.sent:
            _emit(seq, Event(seq.id, text[seq.sent : upto], token))
            seq.sent = upto
        return cut >= 0

    def _finish(
        self, seq: Sequence, reason: str, error: str | None = None, drop_last: bool = False
    ) -> None:
        if drop_last:  # the EOS token is not part of the text
            seq.output.pop()
        self.cache.release(seq.id)
        self.runtime.release(seq.id)
        if self.drafter is not None:
            self.drafter.release(seq.id)
        if seq in self.running:
            self.running.remove(seq)
            self.scheduler.finished(seq.tenant, time.perf_counter() - seq.arrival)
        seq.finish_reason = reason
        self.seqs.pop(seq.id, None)
        tail = seq.text[seq.sent :] if reason in ("stop", "length") else ""
        seq.sent = len(seq.text)
        self.metrics.finished(reason)
        _emit(seq, Event(seq.id, tail, finish_reason=reason, error=error))

    def _finish_safely(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """_finish that cannot raise: a failure while releasing is logged and the sequence is
        still marked finished, so no caller waits on it forever."""
        if seq.finish_reason is not None:
            return
        try:
            self._finish(seq, reason, error)
        except Exception:
            log.exception("finishing sequence %d failed", seq.id)
            if seq in self.running:
                self.running.remove(seq)
                with contextlib.suppress(Exception):
                    self.scheduler.finished(seq.tenant)
            self.seqs.pop(seq.id, None)
            seq.finish_reason = reason
            _emit(seq, Event(seq.id, finish_reason=reason, error=error))

    def _queue_depths(self) -> dict[str, int]:
        return {t.name: len(t.queue) for t in self.scheduler.tenants.values()}

    # --- synchronous use --------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | None = None,
        sink: Callable[[Event], None] | None = None,
    ) -> list[Sequence]:
        """Run the prompts to completion together (continuous batching) and return them; `sink`,
        if given, receives every sequence's events as they come."""
        seqs = [self.submit(p, params, sink) for p in prompts]
        while any(s.finish_reason is None for s in seqs):
            self.step()
        return seqs


# prompt lookup matches the last 3 tokens, else 2; one token alone predicted too poorly (free
# text ran 0.7x with it: BENCHMARKS.md)
DRAFT_NGRAM, DRAFT_MIN_NGRAM = 3, 2
# after m drafts rejected whole in a row a sequence drafts again only after 2**m - 1 plain steps
# (m at most this): free text, where lookups rarely hold, pays little for speculation
MAX_DRAFT_MISSES = 4


def lookup_draft(
    ids: list[int], k: int, max_n: int = DRAFT_NGRAM, min_n: int = DRAFT_MIN_NGRAM
) -> list[int]:
    """Prompt-lookup drafting: up to k tokens that followed the latest earlier occurrence of
    the last n tokens of `ids` (the longest n from max_n down to min_n that occurs); [] if none."""
    for n in range(min(max_n, len(ids) - 1), min_n - 1, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start : start + n] == tail:
                return ids[start + n : start + n + k]
    return []


def _place(model: nn.Module, cfg: EngineConfig) -> torch.device:
    """Move the model to the configured device (in place); -> that device."""
    device = resolve_device(cfg.device)
    if device.type != "cpu" and cfg.int8_activations:
        raise ConfigError(
            f"int8 activations (--int8-act) run on tinyllm's CPU kernels, not on {device}: drop "
            "--int8-act, or use --device cpu"
        )
    if module_device(model) != device:
        model.to(device)
    return device


def _emit(seq: Sequence, event: Event) -> None:
    if seq.sink is not None:
        try:
            seq.sink(event)
        except Exception:  # a broken sink must not stop the engine
            log.exception("sink of sequence %d failed", seq.id)


def _eos_ids(model: nn.Module, tokenizer: object) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(src, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class EngineLoop:
    """Runs engine steps while there is work; sleeps until a submit wakes it.

    `run()` blocks the calling thread; `start()` runs it on a daemon thread. Prefer `run()` on
    the main thread (as `tinyllm serve` does, with HTTP on a side thread): OpenMP gives a second
    thread team only a short spin before sleeping, so kernels called from a non-main thread pay a
    wake-up on every parallel region and ran 2-4x slower here.

    The loop is watched: every iteration stamps a heartbeat, a step that raises is logged and
    counted (Engine.step already ends the affected sequences), and `problem()` says when the loop
    has died or has not come round for `stall_seconds` (a step that hangs), so the server can
    answer 503 instead of letting requests wait forever.
    """

    def __init__(self, engine: Engine, stall_seconds: float = 60.0) -> None:
        self.engine = engine
        self.stall_seconds = stall_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.beat = time.monotonic()
        self.dead: str | None = None  # why the loop ended abnormally
        self._reported: str | None = None

    def start(self) -> EngineLoop:
        self.thread = threading.Thread(target=self.run, name="tinyllm-engine", daemon=True)
        self.thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    def run(self) -> None:
        self.run_until(lambda: False)

    def run_until(self, done: Callable[[], bool]) -> None:
        """Step while there is work, until stop() or `done()` (checked when idle)."""
        try:
            while not self._stop.is_set():
                self.beat = time.monotonic()
                if self.engine.has_work():
                    self._step()
                elif done():
                    return
                else:
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
        except BaseException as e:
            self.dead = f"the engine loop stopped ({type(e).__name__})"
            log.critical("%s; requests are answered 503 until restart", self.dead, exc_info=True)
            raise

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception:  # Engine.step catches its own failures; this is the last net
            log.exception("engine step raised")
            self.engine.metrics.step_failures += 1

    def problem(self) -> str | None:
        """Why the engine cannot serve now (dead or stalled loop), or None when healthy."""
        reason = self.dead
        if reason is None and self.thread is not None and not self.thread.is_alive():
            reason = "the engine loop thread is not running"
        stalled = time.monotonic() - self.beat
        if reason is None and not self._stop.is_set() and stalled > self.stall_seconds:
            reason = f"the engine loop has made no progress for {stalled:.0f} s"
        if reason != self._reported:
            if reason:
                log.error("engine unhealthy: %s", reason)
            else:
                log.warning("engine healthy again")
            self._reported = reason
        return reason


def load_engine(model: str, cfg: EngineConfig | None = None, draft: str | None = None) -> Engine:
    """An Engine over a model spec: a registered name, a Hugging Face directory, a .gguf file or
    a tinyllm output directory (whatever `tinyllm.core.load.load` takes); `draft`, a second
    such spec, is its draft model for speculative decoding."""
    from tinyllm.core.load import load

    on_cpu = resolve_device((cfg or EngineConfig()).device).type == "cpu"
    m, tok = load(model, inference=on_cpu)  # codes held once; a large model's tables narrow
    return Engine(m, tok, cfg, load(draft, inference=on_cpu) if draft else None)


def _vocab(tokenizer: object) -> dict | int:
    """What two tokenizers must agree on to share token ids: the vocabulary, else its size."""
    get = getattr(tokenizer, "get_vocab", None)
    return get() if callable(get) else len(tokenizer)
