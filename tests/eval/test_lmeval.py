"""lm-evaluation-harness integration: the adapter's requests, task export, and parity with our
harness (the same task through `run_task` and through lm-eval's own runner)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from tests.conftest import tiny_config
from tinyllm.data.tasks import Doc, Task, builtin_task
from tinyllm.errors import ConfigError, CorpusError
from tinyllm.eval import lmeval
from tinyllm.eval.lm import ModuleLM, encode
from tinyllm.eval.tasks import _choice_scores, check_task_names, cut_at_stop, run_task, run_tasks

LIMIT = 20


@pytest.fixture(scope="module")
def lm():
    """A tiny random Llama whose positions cover the built-in tasks' contexts (no truncation)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = tiny_config("llama", vocab=len(tok))
    cfg.max_position_embeddings = 1024
    cfg.initializer_range = 0.2  # opinions strong enough that choices differ
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return ModuleLM(model, tok, name="tiny", fast=False)


def _logprobs(lm: ModuleLM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0]  # [len, V]
    return torch.log_softmax(logits.double(), dim=-1)


# ---------------------------------------------------------------- requests (no lm-eval needed)


def test_generate_until_cuts_at_the_first_stop_and_passes_the_budget(lm):
    seen = []
    pieces = [" Paris, France.\nNext", " Rome\n", " Berlin"]

    def fake_generate(requests):
        seen.extend(requests)
        return [encode(lm.tokenizer, p) for p in pieces[: len(requests)]]

    fake = type("Fake", (), {"tokenizer": lm.tokenizer, "name": "fake"})()
    fake.generate = fake_generate
    reqs = [
        ("France: capital", {"until": [".", ","], "max_gen_toks": 5}),
        ("Italy", {"until": "\n", "do_sample": False, "temperature": 0.0}),
        ("Germany", {"until": ["\n"], "max_gen_toks": 3}),
    ]
    texts = lmeval.generate_until(fake, reqs, max_length=64)
    assert texts == [" Paris", " Rome", " Berlin"]
    assert [n for _, n in seen] == [5, lmeval.DEFAULT_MAX_GEN_TOKS, 3]
    assert seen[0][0] == encode(lm.tokenizer, "France: capital")  # the tokenizer adds no BOS
    long = [("word " * 200, {"until": ["\n"], "max_gen_toks": 4})]
    assert lmeval.generate_until(fake, long, max_length=64) == [" Paris, France."]
    assert len(seen[-1][0]) == 60  # the oldest context tokens give way to the budget
    assert seen[-1][0] == encode(lm.tokenizer, "word " * 200)[-60:]


@pytest.mark.parametrize(
    "kwargs", [{"do_sample": True}, {"temperature": 0.7}, {"num_beams": 4, "until": ["\n"]}]
)
def test_generate_until_refuses_sampling(kwargs):
    with pytest.raises(ConfigError, match="greedily"):
        lmeval.greedy_settings(kwargs)


def test_generate_until_accepts_greedy_with_a_temperature_when_sampling_is_off():
    assert lmeval.greedy_settings({"do_sample": False, "temperature": 0.6, "until": "x"}) == (
        ["x"],
        lmeval.DEFAULT_MAX_GEN_TOKS,
    )


def test_loglikelihoods_truncate_the_context_from_the_left(lm):
    pairs = [("word " * 100, "fox")]
    (full,) = lmeval.loglikelihoods(lm, pairs, max_length=1024)
    (cut,) = lmeval.loglikelihoods(lm, pairs, max_length=16)
    from tinyllm.eval.lm import encode_pair

    ctx, cont = encode_pair(lm.tokenizer, *pairs[0])
    keep = 16 + 1 - len(cont)
    (direct,) = lm.loglikelihood([(ctx[-keep:], cont)])
    assert cut == direct and cut != full
    with pytest.raises(ConfigError, match="does not fit"):
        lmeval.loglikelihoods(lm, [("a", "word " * 40)], max_length=8)


# ---------------------------------------------------------------- the missing extra


def test_missing_lm_eval_says_how_to_install(monkeypatch, lm):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'tinyllm\[tasks\]'"):
        lmeval.require_lm_eval()
    with pytest.raises(ConfigError, match=r"hellaswag.*pip install 'tinyllm\[tasks\]'"):
        run_tasks(lm, ["hellaswag"])
    with pytest.raises(ConfigError, match=r"tinyllm\[tasks\]"):
        check_task_names(["polarity", "mmlu"])
    check_task_names(["polarity", "analogy"])  # built-in tasks need nothing


# ---------------------------------------------------------------- export (no lm-eval needed)


def test_export_writes_the_documents_and_a_task_yaml(tmp_path):
    task = builtin_task("polarity")
    data, config = lmeval.export_task(task, tmp_path / "out")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == len(task.docs)
    assert rows[0] == {"context": task.docs[0].context, "choices": ["negative", "positive"],
                       "gold": task.docs[0].gold}  # fmt: skip
    cfg = yaml.safe_load(config.read_text())
    assert cfg["task"] == "polarity" and cfg["output_type"] == "multiple_choice"
    assert (cfg["doc_to_text"], cfg["doc_to_choice"], cfg["doc_to_target"]) == (
        "context",
        "choices",
        "gold",
    )
    assert cfg["target_delimiter"] == " " and cfg["num_fewshot"] == 0
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(data)


def test_export_of_a_generation_task_keeps_its_stops_and_budget(tmp_path):
    task = builtin_task("analogy-gen")
    data, config = lmeval.export_task(task, tmp_path)
    cfg = yaml.safe_load(config.read_text())
    assert cfg["output_type"] == "generate_until"
    assert cfg["generation_kwargs"]["until"] == list(task.stop)
    assert cfg["generation_kwargs"]["max_gen_toks"] == task.max_new_tokens
    assert cfg["metric_list"][0]["metric"] == "exact_match"
    assert json.loads(data.read_text().splitlines()[0]) == {
        "context": task.docs[0].context,
        "answer": task.docs[0].answer,
    }


# ---------------------------------------------------------------- with lm-eval


@pytest.fixture
def lm_eval():
    return pytest.importorskip("lm_eval")


def test_rolling_loglikelihood_is_the_sum_over_disjoint_windows(lm, lm_eval):
    text = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs."
    tokens = encode(lm.tokenizer, text)
    prefix = lm.tokenizer.bos_token_id  # BOS leads (as in lm-eval), though the tokenizer adds none
    seq = [prefix, *tokens]
    assert len(tokens) > 30
    # one window: the whole text after the prefix, from one forward
    logp = _logprobs(lm, seq)
    whole = float(logp[torch.arange(len(tokens)), torch.tensor(tokens)].sum())
    (ll,) = lmeval.rolling_loglikelihoods(lm, [text], max_length=1024)
    assert ll == pytest.approx(whole, abs=1e-3)
    # windows of 8: tokens [s, e) scored once each, after the (at most) 8 tokens before them
    L, direct = 8, 0.0
    for s in range(0, len(tokens), L):
        e = min(s + L, len(tokens))
        a = max(0, e - L)
        lp = _logprobs(lm, seq[a:e])  # row i predicts seq[a + i + 1] = tokens[a + i]
        direct += float(sum(lp[i - a, tokens[i]] for i in range(s, e)))
    (ll8,) = lmeval.rolling_loglikelihoods(lm, [text], max_length=L)
    assert ll8 == pytest.approx(direct, abs=1e-3)
    assert ll8 != pytest.approx(ll, abs=1e-2)  # less context, another number
    windows = lmeval.rolling_windows(tokens, prefix, L)
    assert [t for _, cont in windows for t in cont] == tokens
    assert all(len(c) + len(x) - 1 <= L for c, x in windows)


def _lm_eval_runner(lm, directory, name, limit):
    """lm-eval's own runner: its TaskManager over the exported YAML, its evaluator."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(directory), include_defaults=False)
    model = lmeval.adapter_class()(lm=lm)
    return simple_evaluate(model=model, tasks=[name], task_manager=tm, limit=limit)


def test_polarity_parity_with_lm_eval(lm, lm_eval, tmp_path):
    task = builtin_task("polarity")
    ours = run_task(lm, task, LIMIT)
    lmeval.export_task(task, tmp_path)
    out = _lm_eval_runner(lm, tmp_path, "polarity", LIMIT)
    theirs = out["results"]["polarity"]
    assert ours["n"] == LIMIT == out["n-samples"]["polarity"]["effective"]
    assert theirs["acc,none"] == ours["acc"]
    assert theirs["acc_norm,none"] == ours["acc_norm"]
    assert theirs["acc_stderr,none"] == pytest.approx(ours["stderr"], abs=1e-12)
    # the same choice on every question
    per_doc = {s["doc_id"]: s["acc"] for s in out["samples"]["polarity"]}
    acc, _ = _choice_scores(lm, task.docs[:LIMIT])
    assert [per_doc[i] for i in range(LIMIT)] == acc
    assert 0 < sum(acc) < LIMIT  # the model is not constant: parity is not trivial


def test_generation_parity_with_lm_eval(lm, lm_eval, tmp_path):
    docs = builtin_task("analogy-gen").docs[:8]
    # a task whose answers are what the model generates for half the questions
    lm_texts = lmeval.generate_until(
        lm, [(d.context, {"until": [], "max_gen_toks": 6}) for d in docs], 1024
    )
    stop = ("\n", ".", ",")
    answers = [cut_at_stop(t, stop) if i % 2 == 0 else "nope" for i, t in enumerate(lm_texts)]
    docs = [Doc(context=d.context, answer=a) for d, a in zip(docs, answers, strict=True)]
    task = Task("gen", "generate", docs, max_new_tokens=6, stop=stop)
    ours = run_task(lm, task)
    lmeval.export_task(task, tmp_path)
    out = _lm_eval_runner(lm, tmp_path, "gen", None)
    assert out["results"]["gen"]["exact_match,none"] == ours["accuracy"]
    assert ours["accuracy"] == pytest.approx(sum(bool(a) and a != "nope" for a in answers) / 8)


def test_run_tasks_takes_task_yaml_files_and_directories(lm, lm_eval, tmp_path):
    _, config = lmeval.export_task(builtin_task("polarity"), tmp_path / "one")
    lmeval.export_task(builtin_task("analogy"), tmp_path / "both")
    lmeval.export_task(builtin_task("polarity"), tmp_path / "both")
    by_file = run_tasks(lm, [str(config)], limit=6)
    assert list(by_file) == ["polarity"]  # named as the YAML names it
    by_file = by_file["polarity"]
    ours = run_tasks(lm, ["polarity"], limit=6)["polarity"]
    assert (by_file["n"], by_file["metric"]) == (6, "acc")
    for key in ("accuracy", "acc_norm"):
        assert by_file[key] == ours[key]
    assert by_file["stderr"] == pytest.approx(ours["stderr"])
    by_dir = run_tasks(lm, [str(tmp_path / "both")], limit=2)
    assert sorted(by_dir) == ["analogy", "polarity"] and by_dir["analogy"]["n"] == 2


def test_unknown_tasks_and_missing_files_fail_before_scoring(lm, lm_eval, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_task_names([str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="no lm-eval task YAML"):
        run_tasks(lm, [str(tmp_path)])


def test_task_names_are_checked_against_lm_evals_index_before_scoring(lm_eval, monkeypatch):
    monkeypatch.setattr(lmeval, "lm_eval_task_names", lambda: {"hellaswag", "mmlu"})
    check_task_names(["polarity", "hellaswag", "mmlu"])
    with pytest.raises(ConfigError, match=r"unknown task 'hellaswa'.*polarity"):
        check_task_names(["hellaswa"])


def test_lm_eval_task_names_are_indexed_once(lm_eval, monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path))
    cached = tmp_path / "lm-eval" / f"tasks-{lmeval.lm_eval_version()}.json"
    cached.parent.mkdir()
    cached.write_text(json.dumps(["only_this_task"]))
    assert lmeval.lm_eval_task_names() == {"only_this_task"}  # no 15 s index


def test_an_unreachable_dataset_says_how_to_work_offline(monkeypatch):
    class OfflineManager:
        def load(self, names):
            raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub")

    with pytest.raises(CorpusError, match=r"HF_DATASETS_CACHE.*dataset_path: json"):
        lmeval._build(OfflineManager(), "arc_easy", "arc_easy")


def test_the_model_is_registered_for_lm_eval(lm_eval):
    from lm_eval.api.registry import get_model

    cls = lmeval.adapter_class()
    assert get_model("tinyllm") is cls
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models are still there


def test_pretrained_loads_any_model_spec(lm_eval, tiny_dir):
    device = "cpu" if torch.cuda.is_available() else "cuda:0"  # lm_eval's default: no GPU, cpu
    model = lmeval.adapter_class()(pretrained=str(tiny_dir), batch_size=8, device=device)
    assert isinstance(model.lm, ModuleLM) and model.max_length == 256
    (ll,) = model.loglikelihood([type("R", (), {"args": ("The quick", " brown")})()])
    assert ll[0] < 0
    with pytest.raises(ConfigError, match="unknown dtype"):
        lmeval.adapter_class()(pretrained=str(tiny_dir), dtype="float7")


def test_a_group_reports_its_aggregate(lm, lm_eval, tmp_path):
    lmeval.export_task(builtin_task("polarity"), tmp_path)
    lmeval.export_task(builtin_task("analogy"), tmp_path)
    group = {
        "group": "mine",
        "task": ["polarity", "analogy"],
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
    }
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(group))
    got = run_tasks(lm, [str(tmp_path)], limit=3)
    assert list(got) == ["mine"]  # its tasks are not reported twice
    parts = run_tasks(lm, ["polarity", "analogy"], limit=3)
    mean = (parts["polarity"]["acc"] + parts["analogy"]["acc"]) / 2
    assert (got["mine"]["n"], got["mine"]["metric"]) == (6, "acc")
    assert got["mine"]["accuracy"] == pytest.approx(mean)
