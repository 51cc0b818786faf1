"""Run tasks on a `LanguageModel`: accuracy with its standard error, as lm-eval reports them.

Multiple choice: each choice is scored as the continuation " " + choice of the context (lm-eval's
default target delimiter); `acc` takes the highest summed log-likelihood, `acc_norm` the highest
log-likelihood per character of the choice. Generation: greedy new tokens, cut at the first stop
string, stripped, compared exactly with the answer. The standard error is the sample standard
deviation of the per-question scores over sqrt(n), lm-eval's `mean_stderr`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

from tinyllm.data.tasks import BUILTIN, Doc, Task, builtin_task
from tinyllm.eval.lm import LanguageModel, encode, encode_pair, prefix_ids
from tinyllm.util.progress import make_progress

log = logging.getLogger(__name__)

DELIMITER = " "
CHUNK = 64  # questions scored per call, so the progress bar moves


def mean_stderr(scores: Sequence[float]) -> float:
    """Sample standard deviation over sqrt(n) (0 for fewer than two scores)."""
    n = len(scores)
    if n < 2:
        return 0.0
    mu = sum(scores) / n
    return math.sqrt(sum((x - mu) ** 2 for x in scores) / (n - 1) / n)


def _choice_scores(lm: LanguageModel, docs: Sequence[Doc]) -> tuple[list[float], list[float]]:
    """Per-question acc and acc_norm (1.0 or 0.0) for a chunk of multiple-choice questions."""
    requests = [
        encode_pair(lm.tokenizer, d.context, DELIMITER + c) for d in docs for c in d.choices
    ]
    lls = [ll for ll, _ in lm.loglikelihood(requests)]
    acc, norm, k = [], [], 0
    for d in docs:
        mine = lls[k : k + len(d.choices)]
        k += len(d.choices)
        per_char = [ll / len(c) for ll, c in zip(mine, d.choices, strict=True)]  # as lm-eval
        acc.append(float(max(range(len(mine)), key=mine.__getitem__) == d.gold))
        norm.append(float(max(range(len(mine)), key=per_char.__getitem__) == d.gold))
    return acc, norm


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string, stripped."""
    for s in stop:
        if s in text:
            text = text[: text.index(s)]
    return text.strip()


def _generate_scores(lm: LanguageModel, task: Task, docs: Sequence[Doc]) -> list[float]:
    prefix = prefix_ids(lm.tokenizer)
    requests = [(prefix + encode(lm.tokenizer, d.context), task.max_new_tokens) for d in docs]
    outs = lm.generate(requests)
    texts = [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in outs]
    return [float(cut_at_stop(t, task.stop) == d.answer) for t, d in zip(texts, docs, strict=True)]


def run_task(lm: LanguageModel, task: Task, limit: int | None = None) -> dict:
    """Score `task` (its first `limit` questions) -> {accuracy, stderr, n, metric, seconds, ...}."""
    docs = task.docs[:limit] if limit else task.docs
    scores: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    t0 = time.perf_counter()
    with make_progress() as bar:
        bar_task = bar.add_task(task.name, total=len(docs), info="")
        for start in range(0, len(docs), CHUNK):
            chunk = docs[start : start + CHUNK]
            if task.kind == "generate":
                scores["acc"] += _generate_scores(lm, task, chunk)
            else:
                acc, norm = _choice_scores(lm, chunk)
                scores["acc"] += acc
                scores["acc_norm"] += norm
            mean = sum(scores[task.metric]) / len(scores[task.metric])
            bar.update(bar_task, advance=len(chunk), info=f"{task.metric} {mean:.3f}")
    seconds = time.perf_counter() - t0
    primary = scores[task.metric]
    result = {
        "accuracy": sum(primary) / len(primary),
        "stderr": mean_stderr(primary),
        "n": len(primary),
        "metric": task.metric,
        "seconds": seconds,
    }
    if task.kind == "choice":
        for m in ("acc", "acc_norm"):
            result[m] = sum(scores[m]) / len(scores[m])
            result[f"{m}_stderr"] = mean_stderr(scores[m])
    log.info("%s %s: %.4f +- %.4f", lm.name, task.name, result["accuracy"], result["stderr"])
    return result


def check_task_names(names: Sequence[str]) -> None:
    """Fail early (ConfigError naming the choices) on a name that is not a task: a name that is
    not built-in needs lm-eval installed, and a task file or directory must exist."""
    for name in names:
        if name in BUILTIN:
            continue
        from tinyllm.eval.lmeval import check_spec

        check_spec(name)


def run_tasks(lm: LanguageModel, names: Sequence[str], limit: int | None = None) -> dict[str, dict]:
    """Score each named task -> {name: result}: built-in tasks (data.tasks) here, any other name
    (an lm-eval task or group, a task YAML file or directory) through lm-eval (eval.lmeval)."""
    tasks = [builtin_task(n) for n in names if n in BUILTIN]
    others = [n for n in names if n not in BUILTIN]
    prepared = None
    if others:  # unknown names and unreachable datasets fail before any scoring
        from tinyllm.eval.lmeval import lmeval_tasks, run_lmeval

        prepared = lmeval_tasks(others)
    results = {t.name: run_task(lm, t, limit) for t in tasks}
    if prepared is not None:
        results |= run_lmeval(lm, prepared, limit)
    return results
