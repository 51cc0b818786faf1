"""Built-in evaluation tasks from real data shipped in registry packages (docs/tasks.md).

Every task is a list of `Doc`s built deterministically (fixed seeds, no tokenizer involved), so
every model is asked exactly the same questions:

- `analogy`: Google word analogies (Mikolov et al. 2013, gensim's `questions-words.txt`, 19,544
  questions in 14 categories). PER_CATEGORY questions per category, two solved questions of the
  same category as shots, and CHOICES candidates: the true answer and distractors drawn from the
  category's other answers. Scored by log-likelihood.
- `analogy-gen`: the same questions as exact-match greedy generation (no choices given).
- `polarity`: sentence polarity (Pang & Lee, gensim's `pang_lee_polarity.cor`, 100 negative and
  100 positive), 2-shot classification between " negative" and " positive"; the 198 sentences
  that are not shots are scored.
- `wiki-next`: which sentence comes next. Two consecutive sentences of an article from the
  evaluation slice of the enwiki corpus as context; the true next sentence against three
  sentences from other articles. Scored by length-normalized log-likelihood (acc_norm).
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from tinyllm.data.corpora import load_corpus
from tinyllm.errors import ConfigError, CorpusError

PER_CATEGORY = 20  # analogy questions per category (14 categories)
GEN_PER_CATEGORY = 10  # analogy-gen questions per category
CHOICES = 8  # analogy candidates: the answer and 7 of the category's other answers
POLARITY_SHOTS = 2
WIKI_DOCS = 160
WIKI_CHARS = 262_144  # articles starting in the corpus's first 256 Ki characters (~65k tokens)
SEED = 1234


@dataclass(frozen=True)
class Doc:
    """One question. Multiple choice: `choices` and the index `gold`; generation: `answer`."""

    context: str
    choices: tuple[str, ...] = ()
    gold: int = 0
    answer: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "choice" (log-likelihood of each choice) or "generate" (greedy, exact match)
    docs: list[Doc]
    metric: str = "acc"  # choice: "acc" or "acc_norm" (log-likelihood per character)
    description: str = ""
    max_new_tokens: int = 8
    stop: tuple[str, ...] = ("\n",)
    extra: dict = field(default_factory=dict)


def _gensim_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "the built-in tasks read gensim's test data: pip install --no-deps gensim==4.4.0"
        )
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data"


def _analogy_categories() -> dict[str, list[tuple[str, str, str, str]]]:
    """{category: [(a, b, c, d), ...]} from questions-words.txt, in file order."""
    categories: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for line in (_gensim_data() / "questions-words.txt").read_text().splitlines():
        if line.startswith(":"):
            current = categories.setdefault(line[1:].strip(), [])
        elif line.strip() and current is not None:
            a, b, c, d = line.split()
            current.append((a, b, c, d))
    return categories


def _analogy_line(q: tuple[str, str, str, str], solved: bool) -> str:
    a, b, c, d = q
    return f"{a} is to {b} as {c} is to" + (f" {d}." if solved else "")


def _analogy_docs(per_category: int, with_choices: bool) -> list[Doc]:
    docs = []
    for category, questions in _analogy_categories().items():
        rng = random.Random(f"{SEED}-{category}")
        picked = rng.sample(range(len(questions)), per_category + 2)
        shots = [questions[i] for i in picked[:2]]
        answers = sorted({q[3] for q in questions})
        for i in picked[2:]:
            q = questions[i]
            prompt = "\n".join([_analogy_line(s, True) for s in shots] + [_analogy_line(q, False)])
            if not with_choices:
                docs.append(Doc(context=prompt, answer=q[3]))
                continue
            others = [w for w in answers if w not in (q[3], q[2])]
            choices = [q[3], *rng.sample(others, CHOICES - 1)]
            rng.shuffle(choices)
            docs.append(Doc(context=prompt, choices=tuple(choices), gold=choices.index(q[3])))
    return docs


def _polarity_docs() -> list[Doc]:
    rows = []
    raw = (_gensim_data() / "pang_lee_polarity.cor").read_bytes()
    for line in raw.decode("cp1252", errors="replace").splitlines():  # the file is Windows-1252
        label, _, text = line.partition(" ")
        if label in ("__label__neg", "__label__pos") and text.strip():
            rows.append((text.strip(), int(label == "__label__pos")))
    neg = [r for r in rows if r[1] == 0]
    pos = [r for r in rows if r[1] == 1]
    half = POLARITY_SHOTS // 2
    shots = [x for pair in zip(pos[:half], neg[:half], strict=True) for x in pair]
    labels = ("negative", "positive")
    prefix = "".join(f"Review: {t}\nSentiment: {labels[y]}\n\n" for t, y in shots)
    rest = [r for r in rows if r not in shots]
    return [
        Doc(context=f"{prefix}Review: {t}\nSentiment:", choices=labels, gold=y) for t, y in rest
    ]


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _sentences(document: str) -> list[list[str]]:
    """Sentences of each paragraph, keeping only plain prose of 30-250 characters."""
    paragraphs = []
    for para in document.split("\n"):
        sents = [s.strip() for s in _SENTENCE.split(para)]
        if len(sents) >= 3 and all(30 <= len(s) <= 250 for s in sents):
            paragraphs.append(sents)
    return paragraphs


def _wiki_docs(corpus: str = "enwiki", n: int = WIKI_DOCS) -> list[Doc]:
    documents, chars = [], 0
    for doc in load_corpus(corpus).documents:
        if chars >= WIKI_CHARS:
            break
        documents.append(_sentences(doc))
        chars += len(doc) + 2
    triples = [
        (a, p[i : i + 3])
        for a, paras in enumerate(documents)
        for p in paras
        for i in range(len(p) - 2)
    ]
    if len(documents) < 2 or len(triples) < n:
        raise CorpusError(f"corpus '{corpus}' has too little prose for {n} wiki-next questions")
    pool = [(a, s) for a, paras in enumerate(documents) for p in paras for s in p]
    rng = random.Random(SEED)
    docs = []
    for a, (s1, s2, s3) in rng.sample(triples, n):
        others = [s for b, s in pool if b != a]
        choices = [s3, *rng.sample(others, 3)]
        rng.shuffle(choices)
        docs.append(Doc(context=f"{s1} {s2}", choices=tuple(choices), gold=choices.index(s3)))
    return docs


BUILTIN: dict[str, Callable[[], Task]] = {
    "analogy": lambda: Task(
        "analogy",
        "choice",
        _analogy_docs(PER_CATEGORY, with_choices=True),
        description=f"word analogies, {CHOICES} choices from the category's answers",
    ),
    "analogy-gen": lambda: Task(
        "analogy-gen",
        "generate",
        _analogy_docs(GEN_PER_CATEGORY, with_choices=False),
        description="word analogies, greedy generation, exact match",
        max_new_tokens=6,
        stop=("\n", ".", ","),
    ),
    "polarity": lambda: Task(
        "polarity", "choice", _polarity_docs(), description="sentence polarity, 2-shot"
    ),
    "wiki-next": lambda: Task(
        "wiki-next",
        "choice",
        _wiki_docs(),
        metric="acc_norm",
        description="next sentence of a Wikipedia article, 4 choices",
    ),
}


@cache
def builtin_task(name: str) -> Task:
    """A built-in task by name (built once per process). Its questions come in a seeded random
    order, so the first N (--task-limit) are a fair sample of every category and label."""
    if name not in BUILTIN:
        raise ConfigError(
            f"unknown task '{name}': the built-in tasks are {', '.join(BUILTIN)}; "
            "lm-evaluation-harness tasks and task YAML files need `pip install tinyllm[tasks]`"
        )
    task = BUILTIN[name]()
    random.Random(f"{SEED}-order-{name}").shuffle(task.docs)
    return task
