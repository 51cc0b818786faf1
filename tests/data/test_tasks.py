"""The built-in tasks: built from the shipped data, deterministic, well-formed."""

from __future__ import annotations

from collections import Counter

import pytest

from tinyllm.data import tasks as T
from tinyllm.errors import ConfigError


def test_analogy_questions_come_from_the_file_with_the_true_answer_among_choices():
    categories = T._analogy_categories()
    assert len(categories) == 14 and sum(len(q) for q in categories.values()) == 19544
    solved = {f"{a} {b} {c}": d for qs in categories.values() for a, b, c, d in qs}
    task = T.builtin_task("analogy")
    assert len(task.docs) == 14 * T.PER_CATEGORY
    for doc in task.docs:
        a, _, _, b, _, c, _, _ = doc.context.splitlines()[-1].split()
        assert len(set(doc.choices)) == T.CHOICES
        assert doc.choices[doc.gold] == solved[f"{a} {b} {c}"]
        assert doc.context.count("\n") == 2  # two solved shots, then the question


def test_analogy_gen_asks_the_same_kind_of_question_with_an_answer():
    task = T.builtin_task("analogy-gen")
    assert task.kind == "generate" and len(task.docs) == 14 * T.GEN_PER_CATEGORY
    assert all(d.answer and not d.choices for d in task.docs)


def test_polarity_is_balanced_and_excludes_its_shots():
    task = T.builtin_task("polarity")
    assert len(task.docs) == 200 - T.POLARITY_SHOTS
    assert Counter(d.gold for d in task.docs) == {0: 99, 1: 99}
    shots = task.docs[0].context.split("\n\n")[:-1]
    questions = {d.context.split("\n\n")[-1] for d in task.docs}
    assert all(s.rsplit("\n", 1)[0] not in {q.rsplit("\n", 1)[0] for q in questions} for s in shots)


def test_wiki_next_true_continuation_follows_its_context_in_an_article():
    from tinyllm.data.corpora import load_corpus

    def norm(s: str) -> str:
        return " ".join(s.split())

    text = norm(" ".join(load_corpus("enwiki").documents[:20]))
    task = T.builtin_task("wiki-next")
    assert len(task.docs) == T.WIKI_DOCS and task.metric == "acc_norm"
    for doc in task.docs:
        assert len(set(doc.choices)) == 4
        assert norm(f"{doc.context} {doc.choices[doc.gold]}") in text
        wrong = [c for i, c in enumerate(doc.choices) if i != doc.gold]
        assert all(norm(f"{doc.context} {c}") not in text for c in wrong)
    assert max(Counter(d.gold for d in task.docs).values()) < 0.4 * T.WIKI_DOCS  # no position bias


def test_tasks_are_deterministic_and_any_prefix_is_a_fair_sample():
    for name, build in T.BUILTIN.items():
        docs = T.builtin_task(name).docs
        assert sorted(build().docs, key=repr) == sorted(docs, key=repr), name
    first = T.builtin_task("polarity").docs[:40]
    assert 12 <= sum(d.gold for d in first) <= 28  # both labels, not one block of the file
    shots = {d.context.split("\n")[-1].split()[0] for d in T.builtin_task("analogy").docs[:40]}
    assert len(shots) >= 20  # many categories' questions, not the first category's


def test_unknown_task_names_the_choices():
    with pytest.raises(ConfigError, match="analogy, analogy-gen, polarity, wiki-next"):
        T.builtin_task("hellaswag-typo")
