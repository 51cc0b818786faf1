"""Sampling parameters and the choice of the next token from one sequence's logits.

Numerics are guarded: a temperature under `TEMPERATURE_FLOOR` is greedy (dividing by 1e-45
overflows), every knob is bounded, and non-finite probabilities never reach `multinomial`: the
pick falls back to the argmax and says so. Logits the model itself produced as NaN (or +inf)
raise `NonFiniteLogits`, which the engine turns into that one sequence's error.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

TEMPERATURE_FLOOR = 1e-5  # below it sampling is greedy, as in vLLM
MAX_TOKENS_LIMIT = 1_000_000
MAX_STOPS, MAX_STOP_CHARS = 16, 256
MAX_LOGIT_BIAS, LOGIT_BIAS_RANGE = 300, 100.0
SEED_MAX = 2**64 - 1  # what torch.Generator.manual_seed takes


class NonFiniteLogits(Exception):
    """The model produced NaN or +inf logits: a broken model, not a bad request."""


class SamplingParams(BaseModel):
    """How to pick tokens. A temperature under TEMPERATURE_FLOOR (0 included) is greedy (argmax);
    top_k and top_p then do nothing, while repetition_penalty and logit_bias still reshape the
    logits before the argmax."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    top_k: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)  # 0: off
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOPS)
    ignore_eos: bool = False
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS)

    @field_validator("stop")
    @classmethod
    def _stop_lengths(cls, stops: list[str]) -> list[str]:
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string must be at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[int, float]) -> dict[int, float]:
        for token, value in bias.items():
            if token < 0:
                raise ValueError(f"token id {token} is negative")
            if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
                raise ValueError(f"bias {value} of token {token} is outside [-100, 100]")
        return bias

    @property
    def greedy(self) -> bool:
        return self.temperature < TEMPERATURE_FLOOR

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that reshapes the logits: one batched argmax serves it."""
        return self.greedy and self.repetition_penalty == 1.0 and not self.logit_bias


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator()
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    return gen


def broken_rows(logits: torch.Tensor) -> torch.Tensor:
    """[rows] True where a row of model logits holds NaN or +inf (max propagates NaN)."""
    return ~(logits.amax(-1) < math.inf)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """Add OpenAI's logit_bias (token id -> value in [-100, 100]) to the logits."""
    if not bias:
        return logits
    ids = torch.tensor(list(bias), dtype=torch.long)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype)
    logits = logits.clone()
    logits[ids] += values
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, p: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): divide positive logits of seen tokens by p,
    multiply negative ones by p."""
    if p == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / p, picked * p)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest nucleus of mass top_p to -inf."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample_token(
    logits: torch.Tensor,  # [vocab]
    params: SamplingParams,
    seen: torch.Tensor,  # [n] token ids already in the sequence (prompt and output)
    gen: torch.Generator | None,
) -> tuple[int, bool]:
    """(token, fell_back): fell_back is True when the probabilities would not be finite (the
    largest scaled logit overflowed, or every token was filtered) and the argmax was taken
    instead of a draw. Raises NonFiniteLogits on NaN/+inf model logits.

    One max decides both checks: torch's max propagates NaN, and a softmax whose largest input
    is finite is finite (it subtracts the max), so nothing scans the vocabulary twice."""
    if not float(logits.max()) < math.inf:
        raise NonFiniteLogits("the model produced NaN or infinite logits")
    logits = apply_logit_bias(logits, params.logit_bias)
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits)), False  # no NaN can arise from finite inputs here
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    if not math.isfinite(float(logits.max())):
        return int(torch.argmax(logits)), True
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen)), False


def verify_draft(
    rows: torch.Tensor,  # [len(draft) + 1, vocab]: logits after the next token and each draft
    draft: list[int],
    params: SamplingParams,
    history: list[int],  # the sequence's tokens before the draft (prompt and output)
    gen: torch.Generator | None,
) -> tuple[list[int], bool]:
    """Speculative decoding's verification (Leviathan et al. 2023; Chen et al. 2023) for a
    draft proposed deterministically (prompt lookup: the draft's own distribution is all on its
    token): draft token j is kept with probability p_j(token), else a token is drawn from p_j
    without it and the step ends; when every draft token is kept one more is drawn from the
    last row. The tokens are distributed as sampling one at a time would give them; greedy
    requests keep the draft while it is the argmax. -> (tokens, fell_back)"""
    out: list[int] = []
    fell_back = False
    for j, row in enumerate(rows):
        seen = torch.tensor(history + out) if params.repetition_penalty != 1.0 else _NONE
        d = draft[j] if j < len(draft) else None
        if params.greedy or d is None:
            token, fb = sample_token(row, params, seen, gen)
            fell_back |= fb
            out.append(token)
            if token != d:
                return out, fell_back
            continue
        probs = _probs(row, params, seen)
        if probs is None:  # not finite: the argmax, as sample_token falls back
            out.append(int(torch.argmax(row)))
            return out, True
        if float(torch.rand((), generator=gen)) < float(probs[d]):
            out.append(d)
            continue
        probs[d] = 0.0
        out.append(int(torch.multinomial(probs / probs.sum(), 1, generator=gen)))
        return out, fell_back
    return out, fell_back


_NONE = torch.empty(0, dtype=torch.long)


def _probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor) -> torch.Tensor | None:
    """The sampling distribution sample_token draws from (None where it falls back)."""
    if not float(logits.max()) < math.inf:
        raise NonFiniteLogits("the model produced NaN or infinite logits")
    logits = apply_logit_bias(logits, params.logit_bias)
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    if not math.isfinite(float(logits.max())):
        return None
    return torch.softmax(logits.float(), dim=-1)


def sample(
    logits: torch.Tensor,  # [vocab]
    params: SamplingParams,
    seen: torch.Tensor,  # [n]
    gen: torch.Generator | None,
) -> int:
    """The next token (see sample_token)."""
    return sample_token(logits, params, seen, gen)[0]
