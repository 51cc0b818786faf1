"""lm-evaluation-harness on any tinyllm `LanguageModel` (the `tasks` extra, docs/tasks.md).

`adapter_class()` is an `lm_eval.api.model.LM` registered as lm-eval model "tinyllm": it turns
lm-eval's string requests into the token-id requests of `eval.lm` (encoded by `encode_pair`, as
our own harness encodes them), so every backend that speaks `LanguageModel` (in-memory and
packed checkpoints, pruned models, GGUF through llama.cpp, ONNX, the tinyllm runtime) runs
lm-eval tasks:
- `loglikelihood`: all requests in one call; the backend batches;
- `loglikelihood_rolling`: disjoint windows of the model's maximum length (lm-eval's
  `get_rolling_token_windows` + `make_disjoint_window`), every token scored once;
- `generate_until`: greedy (sampling settings are refused), at most `max_gen_toks` new tokens,
  cut at the first `until` string.

`lmeval_tasks` + `run_lmeval` run lm-eval tasks by name (its TaskManager) or from local task
YAML files and directories, returning `eval.tasks.run_tasks`'s result dicts; `export_task`
writes a built-in task as JSONL + lm-eval task YAML that scores exactly as our harness does.
lm_eval is imported only when one of these needs it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tinyllm.data.tasks import Task
from tinyllm.errors import ConfigError, CorpusError
from tinyllm.eval.lm import LanguageModel, Request, encode, encode_pair, eot_id, prefix_ids
from tinyllm.util.fs import cache_dir, write_text_atomic

log = logging.getLogger(__name__)

LM_EVAL_VERSION = "0.4.13"
INSTALL_HINT = f"pip install 'tinyllm[tasks]' (lm-eval=={LM_EVAL_VERSION})"
MODEL_NAME = "tinyllm"  # the lm-eval model name (--model tinyllm)
DEFAULT_MAX_LENGTH = 2048  # when neither the backend nor the model config says
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default
BOOTSTRAP_ITERS = 1000  # lm-eval's bootstrap for metrics without a closed-form stderr
PRIMARY = ("acc", "acc_norm", "exact_match")  # `accuracy` is the first of these a task reports
GREEDY_OK = {"until", "max_gen_toks", "do_sample", "temperature"}
WHITESPACE = ["^\\s+", "\\s+$"]  # exact_match ignores leading and trailing whitespace


def require_lm_eval(what: str = "lm-evaluation-harness tasks") -> ModuleType:
    """The lm_eval package, or a ConfigError that says how to install it."""
    try:
        import lm_eval
    except ImportError as exc:
        raise ConfigError(
            f"{what} need lm-evaluation-harness, which is not installed: {INSTALL_HINT}"
        ) from exc
    return lm_eval


def lm_eval_version() -> str | None:
    """The installed lm-eval version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- requests


def max_length_of(lm: LanguageModel) -> int:
    """The longest sequence the backend takes: its `max_length`, else the model config's."""
    length = getattr(lm, "max_length", None)
    config = getattr(getattr(lm, "model", None), "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        length = length or getattr(config, attr, None)
    return int(length or DEFAULT_MAX_LENGTH)


def _fit(ctx: list[int], cont: list[int], max_length: int) -> Request:
    """Drop the oldest context tokens so context + continuation[:-1] fits (lm-eval's truncation)."""
    excess = len(ctx) + len(cont) - 1 - max_length
    if excess <= 0:
        return ctx, cont
    if excess >= len(ctx):
        raise ConfigError(
            f"a continuation of {len(cont)} tokens does not fit the model's {max_length} positions"
        )
    return ctx[excess:], cont


def loglikelihoods(
    lm: LanguageModel, pairs: Sequence[tuple[str, str]], max_length: int
) -> list[tuple[float, bool]]:
    """(context, continuation) strings -> (summed log-probability, is greedy), one backend call."""
    requests = [_fit(*encode_pair(lm.tokenizer, c, x), max_length) for c, x in pairs]
    return lm.loglikelihood(requests) if requests else []


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[Request]:
    """Disjoint (context, continuation) windows that score every token once, lm-eval's way."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = get_rolling_token_windows(
        token_list=tokens, prefix_token=prefix, max_seq_len=max_length, context_len=1
    )
    return [make_disjoint_window(w) for w in windows]


def rolling_loglikelihoods(lm: LanguageModel, texts: Sequence[str], max_length: int) -> list[float]:
    """Log-likelihood of each whole text after the tokenizer's BOS token (end-of-text when it
    has none, as lm-eval's `hf` model), in windows of at most `max_length` tokens."""
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    prefix = int(bos) if bos is not None else eot_id(lm.tokenizer)
    per_text = [rolling_windows(encode(lm.tokenizer, t), prefix, max_length) for t in texts]
    flat = [w for windows in per_text for w in windows]
    scores = [ll for ll, _ in lm.loglikelihood(flat)] if flat else []
    out, k = [], 0
    for windows in per_text:
        out.append(float(sum(scores[k : k + len(windows)])))
        k += len(windows)
    return out


def greedy_settings(gen_kwargs: dict[str, Any]) -> tuple[list[str], int]:
    """(until strings, max new tokens) of lm-eval generation settings; sampling is refused."""
    sampling = gen_kwargs.get("do_sample")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if sampling or (sampling is None and temperature > 0) or gen_kwargs.get("num_beams", 1) != 1:
        raise ConfigError(
            f"tinyllm generates greedily, but the task asks for sampling or beam search "
            f"({gen_kwargs}): set do_sample: false (or lm_eval --gen_kwargs do_sample=False)"
        )
    ignored = sorted(set(gen_kwargs) - GREEDY_OK - {"num_beams"})
    if ignored:
        log.info("greedy generation ignores %s", ", ".join(ignored))
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    return until, int(gen_kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_TOKS)


def cut_until(text: str, until: Sequence[str]) -> str:
    """The text before the first of the `until` strings (not stripped, as lm-eval's models do)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def generate_until(
    lm: LanguageModel, requests: Sequence[tuple[str, dict[str, Any]]], max_length: int
) -> list[str]:
    """Greedy continuations of (context, lm-eval generation settings), cut at `until`."""
    settings = [greedy_settings(dict(kw or {})) for _, kw in requests]
    prefix = prefix_ids(lm.tokenizer)
    ids = []
    for (context, _), (_, n) in zip(requests, settings, strict=True):
        ctx = prefix + encode(lm.tokenizer, context)
        ids.append((ctx[-max(1, max_length - n) :], n))  # the oldest tokens go first
    outs = lm.generate(ids) if ids else []
    texts = [lm.tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return [cut_until(t, until) for t, (until, _) in zip(texts, settings, strict=True)]


# --------------------------------------------------------------------------- the lm-eval model


def load_language_model(
    pretrained: str, dtype: str = "float32", device: str | None = None
) -> LanguageModel:
    """Any model spec `tinyllm.load` takes, as a `ModuleLM` (what --model_args pretrained= is)."""
    import torch

    from tinyllm.core.load import load
    from tinyllm.eval.lm import ModuleLM
    from tinyllm.util.device import resolve_device

    spec = str(device or "auto")
    if spec.startswith("cuda") and not torch.cuda.is_available():  # lm_eval's default: cuda:0
        log.warning("no GPU here: %s runs on the CPU", pretrained)
        spec = "cpu"
    where = resolve_device(spec)
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ConfigError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16")
    model, tokenizer = load(str(pretrained), dtype=getattr(torch, str(dtype)), inference=True)
    return ModuleLM(model.to(where), tokenizer, name=str(pretrained))


class _TinyLLMModel:
    """lm-eval model over a tinyllm `LanguageModel` (`lm=`) or a model spec (`pretrained=`);
    batch_size and the like are accepted and ignored: the backend batches by token budget.
    `adapter_class()` mixes it with lm-eval's `LM` base."""

    def __init__(
        self,
        pretrained: str | None = None,
        lm: LanguageModel | None = None,
        max_length: int | None = None,
        dtype: str = "float32",
        device: str | None = None,
        **ignored: Any,
    ) -> None:
        super().__init__()  # lm-eval's LM: rank, world size, cache hook
        if lm is None and not pretrained:
            raise ConfigError("the tinyllm lm-eval model needs pretrained=MODEL_SPEC")
        self.lm = lm or load_language_model(str(pretrained), dtype, device)
        self.max_length = int(max_length or max_length_of(self.lm))
        log.debug("tinyllm lm-eval model ignores %s", sorted(ignored))

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.lm.tokenizer, "name_or_path", self.lm.name))

    def get_model_info(self) -> dict[str, Any]:
        return {"model_name": self.lm.name, "max_length": self.max_length}

    def _cached(self, kind: str, args: list[tuple], out: list) -> list:
        for a, res in zip(args, out, strict=True):
            self.cache_hook.add_partial(kind, a, res)  # lm-eval's --use_cache
        return out

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        pairs = [tuple(r.args) for r in requests]
        return self._cached("loglikelihood", pairs, loglikelihoods(self.lm, pairs, self.max_length))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        texts = [r.args[0] for r in requests]
        out = rolling_loglikelihoods(self.lm, texts, self.max_length)
        return self._cached("loglikelihood_rolling", [(t,) for t in texts], out)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
        args = [tuple(r.args) for r in requests]
        return self._cached("generate_until", args, generate_until(self.lm, args, self.max_length))


@cache
def adapter_class() -> type:
    """The lm-eval model class wrapping a `LanguageModel`, registered as "tinyllm"."""
    require_lm_eval()
    import lm_eval.models  # noqa: F401  (lm-eval's own models: an empty registry loads them lazily)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry, register_model

    cls = type("TinyLLM", (_TinyLLMModel, LM), {"__doc__": _TinyLLMModel.__doc__})
    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(cls)
    return cls


def lm_eval_cli(argv: Sequence[str]) -> None:
    """lm-eval's own command line with the "tinyllm" model registered (lm-eval 0.4.13 finds no
    third-party models by itself): `tinyllm tasks lm-eval --model tinyllm ...`."""
    adapter_class()
    from lm_eval.__main__ import cli_evaluate

    saved, sys.argv = sys.argv, ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


# --------------------------------------------------------------------------- tasks by name/path


@dataclass
class Prepared:
    """lm-eval tasks built (datasets loaded) for the specs a user named."""

    names: dict[str, list[str]]  # spec -> the top-level task/group names it stands for
    objects: list[Any]  # lm-eval Task / Group objects, in order
    manager: Any  # the TaskManager that built them (lm-eval would index its 14k tasks again)


def _is_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or "/" in spec or Path(spec).is_dir()


def check_spec(spec: str) -> None:
    """An early check of a task that is not built-in: lm-eval is installed, a task file or
    directory exists, a name is one of lm-eval's (datasets are fetched later, `lmeval_tasks`)."""
    require_lm_eval(f"the task '{spec}' (not built-in)")
    if _is_path(spec):
        if not Path(spec).exists():
            raise ConfigError(f"task file or directory {spec} does not exist")
    elif spec not in lm_eval_task_names():
        raise _unknown(spec)


def lm_eval_task_names() -> set[str]:
    """lm-eval's task, group and tag names, indexed once per lm-eval version (~15 s) and cached
    under $TINYLLM_CACHE/lm-eval."""
    path = cache_dir("lm-eval") / f"tasks-{lm_eval_version()}.json"
    if path.exists():
        return set(json.loads(path.read_text()))
    from lm_eval.tasks import TaskManager

    names = TaskManager().all_tasks
    write_text_atomic(path, json.dumps(names))
    return set(names)


def _unknown(spec: str) -> ConfigError:
    from tinyllm.data.tasks import BUILTIN

    return ConfigError(
        f"unknown task '{spec}': not a built-in task ({', '.join(BUILTIN)}), an lm-eval task "
        "(list them: tinyllm tasks lm-eval ls tasks) or a task YAML file or directory"
    )


def _task_manager(specs: Sequence[str]) -> Any:
    """A TaskManager over lm-eval's own tasks (when a spec is a name) and the given directories."""
    from lm_eval.tasks import TaskManager

    dirs = [str(Path(s)) for s in specs if _is_path(s) and Path(s).is_dir()]
    with_defaults = any(not _is_path(s) for s in specs)
    return TaskManager(include_path=dirs or None, include_defaults=with_defaults)


def _top_level(tm: Any, directory: str) -> list[str]:
    """The groups and ungrouped tasks defined by the YAML files under `directory`."""
    root = Path(directory).resolve()
    mine = [
        n
        for n, e in tm.task_index.items()
        if e.yaml_path and root in Path(e.yaml_path).resolve().parents
    ]
    groups = [n for n in mine if n in tm.all_groups]
    grouped = {t.task_name for g in groups for t in tm.load([g])["groups"][g].get_all_tasks()}
    return groups + [n for n in mine if n in tm.all_subtasks and n not in grouped]


def _resolve(tm: Any, spec: str) -> list[str]:
    if Path(spec).is_dir():
        names = _top_level(tm, spec)
        if not names:
            raise ConfigError(f"no lm-eval task YAML (a `task:` or `group:` key) under {spec}")
        return names
    if _is_path(spec):
        if not Path(spec).is_file():
            raise ConfigError(f"task file {spec} does not exist")
        return [spec]
    if spec not in tm.task_index:
        raise _unknown(spec)
    return [spec]


def _build(tm: Any, name: str, spec: str) -> tuple[list[str], list[Any]]:
    """Build one task or group, its dataset loaded; a dataset that cannot be fetched says why."""
    try:
        loaded = tm.load([name])
    except OSError as exc:  # ConnectionError, FileNotFoundError, datasets' not-found errors
        raise CorpusError(
            f"the dataset of lm-eval task '{spec}' could not be fetched ({exc}). Without network, "
            "copy the Hugging Face datasets cache from a machine that has it and point "
            "HF_DATASETS_CACHE at it (with HF_DATASETS_OFFLINE=1), or write a task YAML over "
            "local JSON/JSONL files (dataset_path: json, docs/tasks.md)"
        ) from exc
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"lm-eval could not load task '{spec}': {exc}") from exc
    if name in loaded["groups"]:
        return [name], [loaded["groups"][name]]
    return list(loaded["tasks"]), list(loaded["tasks"].values())


def lmeval_tasks(specs: Sequence[str]) -> Prepared:
    """Build the lm-eval tasks for task names and YAML paths (raises before any scoring)."""
    require_lm_eval(f"the tasks {', '.join(specs)} (not built-in)")
    tm = _task_manager(specs)
    prepared = Prepared(names={}, objects=[], manager=tm)
    for spec in specs:
        names = []
        for name in _resolve(tm, spec):
            built_names, objects = _build(tm, name, spec)
            names += built_names
            prepared.objects += objects
        prepared.names[spec] = names
    return prepared


def _result(metrics: dict[str, Any], n: int, seconds: float) -> dict:
    """lm-eval's metrics of one task or group -> our result dict."""
    plain: dict[str, float] = {}
    for key, value in metrics.items():  # "acc,none", "exact_match,strict-match": first filter
        metric = key.partition(",")[0]
        if isinstance(value, int | float) and metric not in plain:
            plain[metric] = float(value)
    primary = next((m for m in PRIMARY if m in plain), None)
    if primary is None:
        raise ConfigError(f"the task reports none of {', '.join(PRIMARY)}: {sorted(plain)}")
    stderr = plain.get(f"{primary}_stderr", 0.0)
    result = {
        "accuracy": plain[primary],
        "stderr": stderr if stderr == stderr else 0.0,  # lm-eval writes "N/A" or NaN for n=1
        "n": n,
        "metric": primary,
        "seconds": seconds,
    }
    for m in ("acc", "acc_norm", "exact_match"):
        if m in plain and m != primary:
            result[m] = plain[m]
            result[f"{m}_stderr"] = plain.get(f"{m}_stderr", 0.0)
    return result


def _n_samples(out: dict, name: str) -> int:
    """Documents scored for a task, or summed over a group's tasks."""
    samples = out.get("n-samples", {})
    if name in samples:
        return int(samples[name]["effective"])
    children = out.get("group_subtasks", {}).get(name, [])
    return sum(_n_samples(out, c) for c in children)


def run_lmeval(lm: LanguageModel, prepared: Prepared, limit: int | None = None) -> dict[str, dict]:
    """Score prepared lm-eval tasks on `lm` through lm-eval's evaluator -> {name: result}."""
    from lm_eval import simple_evaluate

    model = adapter_class()(lm=lm)
    t0 = time.perf_counter()
    out = simple_evaluate(
        model=model,
        tasks=prepared.objects,
        task_manager=prepared.manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=BOOTSTRAP_ITERS,
    )
    seconds = time.perf_counter() - t0
    names = [n for spec_names in prepared.names.values() for n in spec_names]
    results = {}
    for name in names:
        metrics = out["results"].get(name) or out.get("groups", {}).get(name, {})
        results[name] = _result(metrics, _n_samples(out, name), seconds / len(names))
        log.info("%s %s: %.4f", lm.name, name, results[name]["accuracy"])
    return results


# --------------------------------------------------------------------------- export


def _doc_row(task: Task, doc: Any) -> dict[str, Any]:
    if task.kind == "generate":
        return {"context": doc.context, "answer": doc.answer}
    return {"context": doc.context, "choices": list(doc.choices), "gold": doc.gold}


def _scoring(task: Task) -> dict[str, Any]:
    """The output type, target and metrics that score as `eval.tasks.run_task` does."""
    mean = {"aggregation": "mean", "higher_is_better": True}
    if task.kind == "generate":
        return {
            "output_type": "generate_until",
            "doc_to_target": "answer",
            "generation_kwargs": {
                "until": list(task.stop),
                "max_gen_toks": task.max_new_tokens,
                "do_sample": False,
            },  # run_task strips the cut text before comparing:
            "metric_list": [{"metric": "exact_match", **mean, "regexes_to_ignore": WHITESPACE}],
        }
    return {
        "output_type": "multiple_choice",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": [{"metric": m, **mean} for m in ("acc", "acc_norm")],
    }


def task_yaml(task: Task, data_file: Path) -> dict[str, Any]:
    """An lm-eval task config over `data_file` (JSONL) that scores exactly as `run_task` does."""
    return {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "doc_to_text": "context",
        "num_fewshot": 0,  # the shots are part of each context
        **_scoring(task),
        "metadata": {"version": 1.0, "source": "tinyllm tasks export"},
    }


class _Dumper(yaml.SafeDumper):
    """Strings with control characters (the stop string "\\n") double-quoted, on one line."""


_Dumper.add_representer(
    str,
    lambda d, v: d.represent_scalar(
        "tag:yaml.org,2002:str", v, style='"' if any(c < " " for c in v) else None
    ),
)


def export_task(task: Task, directory: str | Path) -> tuple[Path, Path]:
    """Write DIR/NAME.jsonl (the documents) and DIR/NAME.yaml (the lm-eval task) atomically."""
    out = Path(directory).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, config = out / f"{task.name}.jsonl", out / f"{task.name}.yaml"
    rows = "".join(json.dumps(_doc_row(task, d), ensure_ascii=False) + "\n" for d in task.docs)
    text = yaml.dump(task_yaml(task, data), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    write_text_atomic(data, rows)
    write_text_atomic(config, text)
    return data, config
