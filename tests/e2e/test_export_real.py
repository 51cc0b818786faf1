"""GGUF export of the real default model, run by llama.cpp (slow; needs llama-cpp-python)."""

import pytest

import tinyllm
from tests.e2e.common import PROMPTS, our_greedy
from tinyllm.eval.evaluate import evaluation_windows
from tinyllm.export import export

pytestmark = pytest.mark.slow
llamacpp = pytest.importorskip("tinyllm.export.llamacpp")
pytest.importorskip("llama_cpp")


def test_f16_export_generates_and_scores_like_ours(tmp_path):
    model, tok = tinyllm.load("smollm2-135m")
    path = tmp_path / "f16.gguf"
    export(model, tok, path, "gguf", "f16")
    llm = llamacpp.open_gguf(path)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        assert llamacpp.greedy(llm, ids, 32) == our_greedy(model, ids, 32), prompt
    windows, _ = evaluation_windows(tok, windows=20)  # the first half of the default 40
    ours = tinyllm.evaluate(model, tok, windows=20).perplexity
    theirs = llamacpp.perplexity(llm, windows)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)


def test_carried_q4_0_scores_like_our_quantized_model(tmp_path):
    model, tok = tinyllm.load("smollm2-135m")
    tinyllm.quantize(model, tinyllm.RTN(bits=4, group_size=32, sym=True, mse=True))
    path = tmp_path / "q4_0.gguf"
    report = export(model, tok, path, "gguf", "q4_0", strict=True)
    assert len(report.carried) == 210
    windows, _ = evaluation_windows(tok, windows=20)
    ours = tinyllm.evaluate(model, tok, windows=20).perplexity
    theirs = llamacpp.perplexity(llamacpp.open_gguf(path), windows)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)


def test_carried_q3_k_scores_like_our_quantized_model(tmp_path):
    """K-quant blocks (ffn_down: 1536 inputs) and their Q4_0 fallback (576-wide rows), every
    code carried, run by llama.cpp's own kernels: the same perplexity as in memory."""
    model, tok = tinyllm.load("smollm2-135m")
    tinyllm.quantize(model, tinyllm.RTN(kquant="q3_k"))
    path = tmp_path / "q3_k.gguf"
    report = export(model, tok, path, "gguf", "q3_k", strict=True)
    assert len(report.carried) == 210
    assert sum(kind == "Q3_K" for kind in report.types.values()) == 30  # one ffn_down per block
    windows, _ = evaluation_windows(tok, windows=10)
    ours = tinyllm.evaluate(model, tok, windows=10).perplexity
    theirs = llamacpp.perplexity(llamacpp.open_gguf(path), windows)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)


def test_gemma3_f16_export_tokenizes_and_generates_like_ours(tmp_path):
    """The SentencePiece-style vocabulary (scores from merge ranks) and Gemma's graph limits."""
    model, tok = tinyllm.load("gemma3-270m")
    path = tmp_path / "gemma.gguf"
    export(model, tok, path, "gguf", "f16")
    llm = llamacpp.open_gguf(path)
    texts = [
        "In 1905, Albert Einstein published 4 papers: ünïcödé, 日本語, emoji 🙂.",
        "  leading spaces\tand tabs\n\nnew lines",
        "def fib(n):\n    return n if n < 2 else fib(n-1)+fib(n-2)",
    ]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"]
    ids = tok("The history of the Roman Empire")["input_ids"]
    assert llamacpp.greedy(llm, ids, 16) == our_greedy(model, ids, 16)
