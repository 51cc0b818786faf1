"""Exported files as LanguageModels: llama.cpp (GGUF) and onnxruntime (ONNX) score requests and
tasks as the in-memory model does, and `score_windows` matches `tinyllm eval`'s formulas."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model
from tinyllm.eval.lm import LogitsLM, ModuleLM, encode_pair
from tinyllm.eval.tasks import run_tasks
from tinyllm.export import export
from tinyllm.export.scoring import NotScoredError, open_backend, score_windows
from tinyllm.quant.api import quantize
from tinyllm.quant.rtn import RTN

PAIRS = [
    ("The quick brown fox", " jumps over"),
    ("Pack my box", " with five"),
    ("Pack my box", " x"),  # shares its context with the one above
    ("", "Sphinx of black"),  # empty context: the end-of-text id leads
    ("A wizard's job is to vex chumps quickly in fog. Sphinx of black quartz,", " judge my vow."),
]
PACKAGE = {"gguf": "llama_cpp", "onnx": "onnxruntime"}


def _exported(fmt: str, model, tokenizer, tmp_path: Path, qtype: str | None = None) -> Path:
    pytest.importorskip(PACKAGE[fmt])
    path = tmp_path / f"m.{fmt}"
    export(model, tokenizer, path, fmt, qtype or {"gguf": "f32", "onnx": "fp32"}[fmt])
    return path


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_float_export_scores_requests_as_the_model(fmt, tokenizer, tmp_path: Path):
    model = tiny_model(vocab=len(tokenizer))
    lm = open_backend(fmt, _exported(fmt, model, tokenizer, tmp_path), tokenizer)
    requests = [encode_pair(tokenizer, c, x) for c, x in PAIRS]
    want = ModuleLM(model, tokenizer).loglikelihood(requests)
    got = lm.loglikelihood(requests)
    for (ll, greedy), (ll0, greedy0) in zip(got, want, strict=True):
        assert ll == pytest.approx(ll0, abs=1e-3)
        assert greedy == greedy0
    prompts = [(requests[0][0], 8), (requests[4][0], 5), (requests[1][0], 0)]
    new = lm.generate(prompts)
    assert new == ModuleLM(model, tokenizer).generate(prompts)
    assert new == LogitsLM.generate(lm, prompts)  # cached/native greedy = argmax of its logits
    assert [len(n) for n in new] == [8, 5, 0]


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_tasks_run_through_the_export(fmt, tokenizer, tmp_path: Path):
    model = tiny_model(vocab=len(tokenizer))
    lm = open_backend(fmt, _exported(fmt, model, tokenizer, tmp_path), tokenizer)
    got = run_tasks(lm, ["analogy", "analogy-gen"], limit=6)
    want = run_tasks(ModuleLM(model, tokenizer), ["analogy", "analogy-gen"], limit=6)
    for name in want:
        assert got[name]["n"] == 6
        assert got[name]["accuracy"] == want[name]["accuracy"]
        assert got[name]["acc_norm" if name == "analogy" else "accuracy"] == pytest.approx(
            want[name]["acc_norm" if name == "analogy" else "accuracy"]
        )


def test_quantized_gguf_scores_its_own_numbers(tokenizer, tmp_path: Path):
    """A q4_0 file differs from the float model (its KLD is not ~0) and is close to our own
    4-bit model, whose grid it carries."""
    from tinyllm.eval.divergence import token_kl

    model = tiny_model(vocab=len(tokenizer))
    q = copy.deepcopy(model)
    quantize(q, RTN(bits=4, group_size=32, sym=True))
    pytest.importorskip("llama_cpp")
    path = tmp_path / "q.gguf"
    export(q, tokenizer, path, "gguf", "q4_0", embed_type="f32", strict=True)
    text = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs. " * 4
    windows = torch.tensor(tokenizer(text)["input_ids"][:96]).view(3, 32)
    scores = score_windows(open_backend("gguf", path, tokenizer), windows, model)
    with torch.no_grad():
        ours = float(token_kl(model(windows).logits[:, :-1], q(windows).logits[:, :-1]).mean())
    assert scores["kld"] > 1e-5 and scores["tokens"] == 93
    assert scores["kld"] == pytest.approx(ours, rel=0.3)


def test_score_windows_matches_evaluate(tokenizer, tmp_path: Path):
    from tinyllm.eval.perplexity import perplexity, token_nll

    model = tiny_model(vocab=len(tokenizer))
    lm = open_backend("onnx", _exported("onnx", model, tokenizer, tmp_path), tokenizer)
    lm.tokens_per_batch = 64  # two windows a batch: the sums run over batches
    text = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs. " * 4
    windows = torch.tensor(tokenizer(text)["input_ids"][:96]).view(3, 32)
    scores = score_windows(lm, windows, model)
    with torch.no_grad():
        ours = model(windows).logits[:, :-1]
    ppl = perplexity(float(token_nll(ours, windows[:, 1:]).double().sum()), 93)
    assert scores["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert scores["kld"] < 1e-6 and scores["top1_agreement"] == 1.0


def test_unavailable_runtime_or_unreadable_file_is_not_scored(tokenizer, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a)
    )
    with pytest.raises(NotScoredError, match=r"llama.cpp is not installed \(pip install llama"):
        open_backend("gguf", tmp_path / "m.gguf", tokenizer)
    monkeypatch.undo()
    pytest.importorskip("onnxruntime")
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(NotScoredError, match=r"onnxruntime cannot read bad\.onnx"):
        open_backend("onnx", tmp_path / "bad.onnx", tokenizer)


def test_llamacpp_context_grows_to_the_trained_length(tokenizer, tmp_path: Path):
    from tinyllm.errors import ConfigError
    from tinyllm.export.llamacpp import LlamaCppLM, trained_context

    model = tiny_model(vocab=len(tokenizer))  # trained context: 256 positions
    lm = LlamaCppLM(_exported("gguf", model, tokenizer, tmp_path), tokenizer, n_ctx=64)
    assert trained_context(lm.llm) == 256
    seq = (tokenizer(" ".join(p for pair in PAIRS for p in pair) * 4)["input_ids"] * 2)[:100]
    (got,) = lm.tail_logits([seq], [90])
    assert len(lm.llm.input_ids) == 128 and got.shape == (10, len(tokenizer))
    with torch.no_grad():
        want = model(torch.tensor([seq])).logits[0, 90:]
    assert torch.allclose(got, want, atol=2e-3)
    with pytest.raises(ConfigError, match=r"longer than m\.gguf was trained for"):
        lm.tail_logits([seq * 3], [0])


def test_llamacpp_reuses_a_shared_context_exactly(tokenizer, tmp_path: Path):
    """Sequences sharing a context reuse llama.cpp's cache for it: the same logits as a fresh
    evaluation of each, in any request order."""
    from tinyllm.export.llamacpp import logits

    model = tiny_model(vocab=len(tokenizer))
    lm = open_backend("gguf", _exported("gguf", model, tokenizer, tmp_path), tokenizer)
    ctx = tokenizer("A wizard's job is to vex chumps quickly in fog.")["input_ids"]
    seqs = [[*ctx, 40, 41, 42], ctx[:5], [*ctx, 40, 50], [*ctx, 60], [*ctx, 40, 41, 42]]
    starts = [3, 0, len(ctx) - 1, len(ctx), 1]
    got = lm.tail_logits(seqs, starts)
    for seq, start, z in zip(seqs, starts, got, strict=True):
        fresh = torch.from_numpy(logits(lm.llm, seq, start))
        assert z.shape == fresh.shape and torch.allclose(z, fresh, atol=1e-5)
