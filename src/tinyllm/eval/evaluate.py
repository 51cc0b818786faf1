"""`evaluate`: score any model the same way (docs/evaluation.md).

Perplexity over back-to-back windows of the corpus's evaluation slice, every position after the
first scored; with a reference, mean per-token KL(reference || model) and top-1 agreement on the
same positions; always size, bits per weight, time and memory.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tinyllm.core.kernels import fast_linears
from tinyllm.data.corpora import DEFAULT_CORPUS, load_corpus
from tinyllm.data.windows import eval_windows, tokenize_corpus, with_bos
from tinyllm.errors import TokenizerMismatchError
from tinyllm.eval.divergence import token_kl, top1_agree
from tinyllm.eval.perplexity import perplexity, token_nll
from tinyllm.eval.tasks import check_task_names
from tinyllm.models.anatomy import analyze
from tinyllm.models.size import bits_per_weight, param_count, size_bytes
from tinyllm.models.sparsity import sparsity_of
from tinyllm.util.device import module_device, resolve_device
from tinyllm.util.energy import UNAVAILABLE, EnergyMeter
from tinyllm.util.fs import write_json_atomic
from tinyllm.util.memory import peak_rss_bytes
from tinyllm.util.progress import make_progress

log = logging.getLogger(__name__)

TOKENS_PER_BATCH = 2048  # windows are batched up to this many tokens per forward
LOGIT_BYTES = 512 << 20  # and up to this many bytes of float32 logits (a 128k vocabulary: 1k)


@dataclass
class EvalResult:
    model: str
    corpus: str
    seq_len: int
    windows: int
    tokens: int
    perplexity: float
    kld: float | None
    top1_agreement: float | None
    params: int
    size_bytes: int
    bits_per_weight: float
    sparsity: float  # fraction of exact zeros in the block linears
    eval_seconds: float
    tokens_per_second: float
    peak_rss_bytes: int
    energy_joules: float | None = None  # in the model's forwards (docs/energy.md); None: no counter
    joules_per_token: float | None = None  # energy_joules / tokens
    energy_source: str = UNAVAILABLE  # the counters read, or why there are none
    tasks: dict[str, dict] | None = None  # {task: {accuracy, stderr, n, metric, seconds}}

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: Path) -> None:
        write_json_atomic(Path(path), self.to_dict())


def check_same_tokenizer(tokenizer: object, ref_tokenizer: object) -> None:
    if tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        raise TokenizerMismatchError(
            "the reference model uses a different tokenizer: KL divergence and agreement need "
            "both models to predict over the same vocabulary"
        )


@torch.inference_mode()
def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] on the model's device (the batch is moved there first)."""
    batch = batch.to(module_device(model))
    logits = model(input_ids=batch, use_cache=False).logits
    if logits.device.type == "cuda":
        torch.cuda.synchronize(logits.device)  # the forward's time, not its launch
    return logits


def place(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Move `model` to `device` in place (None: leave it where it is); -> where it computes."""
    if device is None:
        return module_device(model)
    target = resolve_device(device)
    if module_device(model) != target:
        model.to(target)
    return target


def evaluation_windows(
    tokenizer: object, corpus: str | Path = DEFAULT_CORPUS, seq_len: int = 512, windows: int = 40
) -> tuple[torch.Tensor, str]:
    """The scored windows [W, L(+1 with BOS)] and the corpus name: what every evaluation uses."""
    text = load_corpus(corpus)
    ids = tokenize_corpus(text, tokenizer)
    return with_bos(eval_windows(ids, seq_len, windows, text.name), tokenizer), text.name


def evaluate(
    model: nn.Module,
    tokenizer: object,
    *,
    corpus: str | Path = DEFAULT_CORPUS,
    seq_len: int = 512,
    windows: int = 40,
    reference: tuple[nn.Module, object] | None = None,
    batch_size: int | None = None,
    name: str | None = None,
    fast: bool = True,
    device: str | torch.device | None = None,
    tasks: Sequence[str] = (),
    task_limit: int | None = None,
) -> EvalResult:
    """Score `model` on the evaluation windows of `corpus` (and against `reference` if given),
    then on `tasks` (their first `task_limit` questions; eval.tasks).

    `fast` runs fp32 linears through oneDNN (core.kernels) for the duration, on CPU only;
    results match the plain path to fp32 rounding. `device` (auto, cpu, cuda[:N]; None: where
    the model is) moves the model and the reference there in place; each batch of windows
    follows them and the scores come back as Python numbers.
    """
    if reference is not None:
        check_same_tokenizer(tokenizer, reference[1])
    check_task_names(tasks)  # before any scoring
    data, corpus_name = evaluation_windows(tokenizer, corpus, seq_len, windows)  # [W, L(+1)]
    batch_size = batch_size or _batch_size(model, data.shape[1])
    model.eval()
    ref_model = reference[0] if reference is not None else None
    on = place(model, device)
    if ref_model is not None:
        place(ref_model, on)
    t0 = time.perf_counter()
    meter = EnergyMeter([on])
    sums = _score_windows(model, ref_model, data, batch_size, fast and on.type == "cpu", meter)
    seconds = time.perf_counter() - t0
    energy = meter.reading()
    return EvalResult(
        model=name or str(getattr(model, "name_or_path", "") or type(model).__name__),
        corpus=corpus_name,
        seq_len=seq_len,
        windows=windows,
        tokens=sums.scored,
        perplexity=perplexity(sums.nll, sums.scored),
        kld=sums.kl / sums.scored if reference is not None else None,
        top1_agreement=sums.agree / sums.scored if reference is not None else None,
        **_model_stats(model),
        eval_seconds=seconds,
        tokens_per_second=sums.scored / sums.model_seconds,
        peak_rss_bytes=peak_rss_bytes(),
        energy_joules=energy.joules,
        joules_per_token=energy.per(sums.scored),
        energy_source=energy.source,
        tasks=_tasks(model, tokenizer, name, tasks, task_limit, fast) if tasks else None,
    )


def _batch_size(model: nn.Module, length: int) -> int:
    """Windows per forward: up to TOKENS_PER_BATCH tokens and LOGIT_BYTES of logits."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    tokens = min(TOKENS_PER_BATCH, LOGIT_BYTES // (4 * int(vocab)))
    return max(1, tokens // length)


def _tasks(
    model: nn.Module,
    tokenizer: object,
    name: str | None,
    tasks: Sequence[str],
    limit: int | None,
    fast: bool,
) -> dict[str, dict]:
    from tinyllm.eval.lm import ModuleLM
    from tinyllm.eval.tasks import run_tasks

    return run_tasks(ModuleLM(model, tokenizer, name or "model", fast), tasks, limit)


@dataclass
class _Sums:
    """Running totals over the scored positions."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    scored: int = 0
    model_seconds: float = 0.0  # in the evaluated model's forwards
    energy: EnergyMeter | None = None  # counts the evaluated model's forwards only

    def add(self, model: nn.Module, ref: nn.Module | None, batch: torch.Tensor) -> None:
        """Score one batch of windows [B, L]."""
        with self.energy or contextlib.nullcontext():
            t1 = time.perf_counter()
            logits = _logits(model, batch)[:, :-1]  # [B, L-1, V] predicts batch[:, 1:]
            self.model_seconds += time.perf_counter() - t1
        batch = batch.to(logits.device)
        self.nll += float(token_nll(logits, batch[:, 1:]).double().sum())
        self.scored += batch[:, 1:].numel()
        if ref is not None:
            ref_logits = _logits(ref, batch)[:, :-1]
            self.kl += float(token_kl(ref_logits, logits).double().sum())
            self.agree += int(top1_agree(ref_logits, logits).sum())


def _score_windows(
    model: nn.Module,
    ref: nn.Module | None,
    data: torch.Tensor,
    batch_size: int,
    fast: bool,
    energy: EnergyMeter | None = None,
) -> _Sums:
    """Score every window of `data` [W, L] in batches, with a progress bar."""
    sums = _Sums(energy=energy)
    tokens_per_batch = batch_size * data.shape[1]
    with contextlib.ExitStack() as stack:
        if fast:
            stack.enter_context(fast_linears(model, tokens_per_batch))
            if ref is not None:
                stack.enter_context(fast_linears(ref, tokens_per_batch))
        bar = stack.enter_context(make_progress())
        task = bar.add_task("evaluating", total=data.shape[0], info="")
        for start in range(0, data.shape[0], batch_size):
            batch = data[start : start + batch_size]
            sums.add(model, ref, batch)
            ppl = perplexity(sums.nll, sums.scored)
            bar.update(task, advance=batch.shape[0], info=f"ppl {ppl:.3f}")
    return sums


def _model_stats(model: nn.Module) -> dict[str, int | float]:
    """Size, bits per weight and sparsity of the (possibly compressed) model."""
    anatomy = analyze(model)
    return {
        "params": param_count(model),
        "size_bytes": size_bytes(model),
        "bits_per_weight": bits_per_weight(anatomy),
        "sparsity": sparsity_of(model),
    }
