"""ONNX export of the real default model, run by onnxruntime (slow)."""

import numpy as np
import pytest
import torch

import tinyllm
from tests.e2e.common import PROMPTS, our_greedy
from tinyllm.eval.evaluate import evaluation_windows
from tinyllm.export import export

pytestmark = pytest.mark.slow
onnxrt = pytest.importorskip("tinyllm.export.onnxrt")


def test_fp32_onnx_matches_logits_and_greedy_tokens(tmp_path):
    model, tok = tinyllm.load("smollm2-135m")
    export(model, tok, tmp_path / "m.onnx", "onnx")
    sess = onnxrt.open_onnx(tmp_path / "m.onnx")
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(onnxrt.logits(sess, ids) - ours).max() < 1e-3
        assert onnxrt.greedy(sess, ids, 32) == our_greedy(model, ids, 32), prompt


def test_q4_onnx_scores_like_our_quantized_model(tmp_path):
    model, tok = tinyllm.load("smollm2-135m")
    tinyllm.quantize(model, tinyllm.RTN(bits=4, group_size=32, sym=True, mse=True))
    report = export(model, tok, tmp_path / "q.onnx", "onnx", "q4")
    assert len(report.nbits) == 210
    windows, _ = evaluation_windows(tok, windows=20)
    ours = tinyllm.evaluate(model, tok, windows=20).perplexity
    theirs = onnxrt.perplexity(onnxrt.open_onnx(tmp_path / "q.onnx"), windows)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)
