"""Hugging Face export of the real default model, loaded back by transformers (slow)."""

import pytest

import tinyllm
from tinyllm.export import export

pytestmark = pytest.mark.slow
pytest.importorskip("compressed_tensors")


def test_compressed_tensors_export_scores_like_ours(tmp_path):
    """Symmetric 4-bit g32 on the real model (asymmetric grids: tests/export/test_hf_export.py)."""
    from transformers import AutoModelForCausalLM

    model, tok = tinyllm.load("smollm2-135m")
    tinyllm.quantize(model, tinyllm.RTN(bits=4, group_size=32, sym=True, mse=True))
    report = export(model, tok, tmp_path / "hf", "hf")
    assert len(report["packed"]) == 210
    ours = tinyllm.evaluate(model, tok, windows=20).perplexity
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    theirs = tinyllm.evaluate(back, tok, windows=20).perplexity
    assert abs(theirs / ours - 1) < 0.005, (theirs, ours)
