"""What a task needs from a model (`LanguageModel`), and the backend for in-memory models.

A task asks two things of a model, on token ids:
- `loglikelihood([(context, continuation), ...])`: the summed log-probability of each
  continuation after its context, and whether greedy decoding would have produced it;
- `generate([(context, n), ...])`: up to n greedy new ids after each context.

`LogitsLM` derives both from one method a backend writes, `tail_logits` (the logits of the last
positions of each sequence), so a GGUF file through llama.cpp, an ONNX file through onnxruntime
and the tinyllm runtime are all scored by the same code. `ModuleLM` is the backend for any model
`tinyllm.load` returns (a Hugging Face module, possibly compressed): padded batches, and cached
batched generation through `generate`.

Requests are encoded the way lm-evaluation-harness encodes them (`encode_pair`), so the same
task gives the same numbers through our harness and through lm-eval's runner.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from tinyllm.core.kernels import fast_linears
from tinyllm.util.device import module_device

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)
LOGITS_BYTES = 512 << 20  # float32 logits held per forward (tokens per batch follow the vocab)


class LanguageModel(Protocol):
    name: str
    tokenizer: Any

    def loglikelihood(self, requests: Sequence[Request]) -> list[tuple[float, bool]]: ...

    def generate(self, requests: Sequence[tuple[list[int], int]]) -> list[list[int]]: ...


def prefix_ids(tokenizer: Any) -> list[int]:
    """What starts every sequence: BOS when the tokenizer adds one by default, else nothing."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and probe and probe[0] == bos else []


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Request:
    """Token ids of (context, continuation), lm-eval's way: trailing spaces of the context move
    to the continuation; the continuation's ids are those of the whole string after the
    context's, so a merge across the boundary is not split. BOS (if any) leads the context, and
    an empty context is the end-of-text token, as in lm-eval."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    prefix = prefix_ids(tokenizer)
    if not prefix and not ctx:
        prefix = [eot_id(tokenizer)]
    return prefix + ctx, whole[len(ctx) :]


def eot_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos if eos is not None else 0)


def _score(z: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """(sum of log p(cont), all greedy) from the logits rows [len(cont), V] predicting `cont`."""
    target = torch.tensor(cont, dtype=torch.long)
    logp = torch.log_softmax(z.float(), dim=-1)
    picked = logp.gather(1, target[:, None]).squeeze(1)
    return float(picked.double().sum()), bool((logp.argmax(-1) == target).all())


def _batches(lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Indices grouped longest first into batches of at most `budget` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * lengths[batch[0]] > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


class LogitsLM:
    """Base backend: implement `tail_logits`; loglikelihood and greedy generation follow."""

    tokens_per_batch = 2048

    def __init__(self, name: str, tokenizer: Any) -> None:
        self.name = name
        self.tokenizer = tokenizer

    def tail_logits(self, seqs: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        """For each sequence, float32 logits [len(seq) - start, vocab] predicting the tokens
        after positions start .. len(seq)-1."""
        raise NotImplementedError

    def loglikelihood(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """Each sequence context + continuation[:-1] is run once, however many requests share
        it (the choices of a question that are one token long all read the context's last row);
        each batch's logits are scored and dropped before the next batch runs."""
        users: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(requests):
            users.setdefault(tuple(ctx + cont[:-1]), []).append(i)  # the last token: a target
        keys = list(users)
        starts = [min(len(requests[i][0]) - 1 for i in users[k]) for k in keys]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for batch in _batches([len(k) for k in keys], self.tokens_per_batch):
            logits = self.tail_logits([list(keys[b]) for b in batch], [starts[b] for b in batch])
            for b, z in zip(batch, logits, strict=True):
                for i in users[keys[b]]:
                    ctx, cont = requests[i]
                    first = len(ctx) - 1 - starts[b]
                    results[i] = _score(z[first : first + len(cont)], cont)
        return results

    def generate(self, requests: Sequence[tuple[list[int], int]]) -> list[list[int]]:
        """Greedy, one token per step over the whole sequence (backends may do better)."""
        out: list[list[int]] = []
        eot = eot_id(self.tokenizer)
        for ctx, n in requests:
            new: list[int] = []
            while len(new) < n:
                seq = ctx + new
                (z,) = self.tail_logits([seq], [len(seq) - 1])
                new.append(int(z[-1].argmax()))
                if new[-1] == eot:
                    break
            out.append(new)
        return out


class ModuleLM(LogitsLM):
    """A model `tinyllm.load` returns (Hugging Face module, maybe compressed), on its device."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, name: str = "model", fast: bool = True
    ) -> None:
        super().__init__(name, tokenizer)
        self.model = model.eval()
        head = model.get_output_embeddings()  # a packed head (QuantLinear) has no .weight
        vocab = getattr(head, "out_features", None) or getattr(model.config, "vocab_size", 0)
        self.tokens_per_batch = max(64, min(2048, LOGITS_BYTES // (4 * max(1, vocab))))
        self.fast = fast and module_device(model).type == "cpu"
        self.pad = eot_id(tokenizer)
        self._keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._depth = 0

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """oneDNN linears (packed once per call of the outermost method) and inference mode."""
        if self._depth:
            yield
            return
        self._depth += 1
        try:
            with contextlib.ExitStack() as stack:
                if self.fast:
                    stack.enter_context(fast_linears(self.model, self.tokens_per_batch))
                stack.enter_context(torch.inference_mode())
                yield
        finally:
            self._depth -= 1

    def loglikelihood(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        with self._running():
            return super().loglikelihood(requests)

    def tail_logits(self, seqs: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        """Left-padded batch (so every tail ends at the last column); the head runs only on the
        tail columns when the model takes `logits_to_keep`."""
        width = max(len(s) for s in seqs)
        tails = [len(s) - st for s, st in zip(seqs, starts, strict=True)]
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s)
            mask[r, width - len(s) :] = 1
        device = module_device(self.model)
        inputs = dict(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(0)
        )
        extra = {"logits_to_keep": max(tails)} if self._keeps else {}
        with self._running():
            logits = self.model(
                **{k: v.to(device) for k, v in inputs.items()}, use_cache=False, **extra
            ).logits  # [B, max(tails) or width, V]
        cols = logits.shape[1]
        return [logits[r, cols - t :].float().cpu() for r, t in enumerate(tails)]

    def generate(self, requests: Sequence[tuple[list[int], int]]) -> list[list[int]]:
        """Greedy, cached, in left-padded batches of equal new-token budgets."""
        out: list[list[int]] = [[] for _ in requests]
        lengths = [len(c) + n for c, n in requests]
        for batch in _batches(lengths, self.tokens_per_batch):
            n = max(requests[i][1] for i in batch)
            width = max(len(requests[i][0]) for i in batch)
            ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ctx = requests[i][0]
                ids[r, width - len(ctx) :] = torch.tensor(ctx)
                mask[r, width - len(ctx) :] = 1
            device = module_device(self.model)
            with self._running():
                gen = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=n,
                    do_sample=False,
                    pad_token_id=self.pad,
                    eos_token_id=self.pad,
                )
            for r, i in enumerate(batch):
                new = gen[r, width:].tolist()[: requests[i][1]]
                out[i] = new[: new.index(self.pad) + 1] if self.pad in new else new
        return out
