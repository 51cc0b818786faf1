"""Weight quantization on the real default model (slow)."""

import pytest
import torch

import tinyllm
from tinyllm.checkpoint import round_floats
from tinyllm.kernels.qlinear import QuantLinear

pytestmark = pytest.mark.slow


def test_smollm2_rtn_checkpoint_round_trip(tmp_path):
    model, tok = tinyllm.load("smollm2-135m")
    report = tinyllm.quantize(model, tinyllm.RTN(bits=4, group_size=32, sym=True))
    assert len(report["layer_errors"]) == 30 * 7
    round_floats(model, torch.float16)  # as `tinyllm quantize` does: float tensors stored as fp16
    out = tinyllm.save_checkpoint(model, tok, tmp_path / "q", {"steps": []})
    fp16_bytes = 134_515_008 * 2
    on_disk = (out / "model.safetensors").stat().st_size
    assert on_disk < 0.45 * fp16_bytes  # linears at 4.5 bits, embeddings and norms in fp16
    back, _ = tinyllm.load(out)
    assert sum(isinstance(m, QuantLinear) for m in back.modules()) == 210
    x = torch.tensor([tok("The history of the Roman Empire")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


def test_smollm2_gptq_beats_rtn_on_layer_error():
    """Few calibration windows and one block's worth of evidence: GPTQ's output error is lower."""
    model, tok = tinyllm.load("smollm2-135m")
    calib = tinyllm.calibration_windows(tok, samples=8, seq_len=256)
    gptq = tinyllm.quantize(model, tinyllm.GPTQ(bits=3, group_size=32), calib=calib)
    r = tinyllm.evaluate(model, tok, windows=4)
    model2, _ = tinyllm.load("smollm2-135m")
    tinyllm.quantize(model2, tinyllm.RTN(bits=3, group_size=32))
    r2 = tinyllm.evaluate(model2, tok, windows=4)
    assert r.perplexity < r2.perplexity
    assert max(gptq["layer_errors"].values()) < 0.5
