"""Quantizers on tiny random models: GPTQ math, the block-by-block glue, checkpoints, errors."""

import gc
import weakref
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import tinyllm
import tinyllm.core.calib as calib_mod
from tests.conftest import tiny_model
from tests.quant.tiny import quantize_tiny_model
from tinyllm.checkpoint import save_checkpoint
from tinyllm.core.hessian import output_error
from tinyllm.errors import ConfigError
from tinyllm.models.anatomy import analyze
from tinyllm.quant.api import quantize
from tinyllm.quant.awq import AWQ
from tinyllm.quant.gptq import GPTQ, gptq_quantize
from tinyllm.quant.int8 import Int8Static
from tinyllm.quant.mixed import Mixed
from tinyllm.quant.nf4 import NF4
from tinyllm.quant.rtn import RTN, rtn_quantize
from tinyllm.quant.smoothquant import SmoothQuant


def _layer_problem(seed: int = 0):
    """A weight and a Hessian from correlated inputs (where GPTQ's error feedback pays off)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(64, 64, generator=g)
    X = torch.randn(2048, 64, generator=g) @ mix  # correlated features
    W = torch.randn(48, 64, generator=g)
    return W, 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_gptq_beats_rtn_on_output_error(act_order, static):
    W, H = _layer_problem()
    cfg = GPTQ(bits=3, group_size=32, act_order=act_order, static_groups=static, mse=False)
    qw, err = gptq_quantize(W, H, cfg)
    rtn = rtn_quantize(W, RTN(bits=3, group_size=32))
    assert err == pytest.approx(output_error(W, qw.dequantize(), H), rel=1e-4)
    assert err < 0.7 * output_error(W, rtn.dequantize(), H)


def test_gptq_identity_hessian_is_rtn():
    """With H = I the error feedback vanishes: GPTQ rounds like RTN on the same grid."""
    W = torch.randn(8, 64)
    qw, _ = gptq_quantize(
        W, torch.eye(64), GPTQ(bits=4, group_size=32, act_order=False, mse=False, damp=0.0)
    )
    ref = rtn_quantize(W, RTN(bits=4, group_size=32))
    assert torch.equal(qw.codes(), ref.codes())


def test_gptq_retries_cholesky_with_more_damping(caplog):
    W = torch.randn(8, 32)
    H = -torch.eye(32)  # not positive definite until heavily damped... never, it stays negative
    with pytest.raises(ConfigError, match="not positive definite"):
        gptq_quantize(W, H, GPTQ(bits=4, group_size=32))
    assert "retrying" in caplog.text


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_a_pruned_layer_pruned(sym, act_order):
    """Quantizing after pruning: zeros stay exact zeros, the error feedback goes to kept weights."""
    W, H = _layer_problem()
    W[torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.5] = 0
    cfg = GPTQ(bits=4, group_size=32, sym=sym, act_order=act_order, static_groups=False)
    qw, err = gptq_quantize(W, H, cfg)
    Wq = qw.dequantize()
    assert torch.equal(Wq[W == 0], torch.zeros(int((W == 0).sum())))
    rtn = rtn_quantize(W, RTN(bits=4, group_size=32, sym=sym))
    assert err < output_error(W, rtn.dequantize(), H)


def test_gptq_dead_inputs():
    W, H = _layer_problem()
    H[3, :] = 0
    H[:, 3] = 0
    qw, err = gptq_quantize(W, H, GPTQ(bits=4, group_size=32))
    assert torch.isfinite(qw.dequantize()).all() and err < 0.05


@pytest.mark.parametrize(
    "cfg",
    [
        RTN(bits=4, group_size=32),
        GPTQ(bits=4, group_size=32),
        NF4(block_size=32),
        RTN(bits=3, group_size=-1),
        GPTQ(bits=8, group_size=-1, sym=True),
    ],
)
def test_methods_on_a_tiny_model(cfg, tmp_path: Path, tokenizer):
    run = quantize_tiny_model(cfg, vocab=len(tokenizer))
    assert len(run.report["layer_errors"]) == 14 and run.quant_linears() == 14
    assert run.cosine() > 0.9
    # checkpoint round trip: identical logits
    save_checkpoint(run.model, tokenizer, tmp_path / "q", {"steps": [cfg.describe()]})
    back, _ = tinyllm.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(back(run.x).logits, run.got)


def test_checkpoint_size_reflects_bits(tmp_path: Path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    save_checkpoint(model, tokenizer, tmp_path / "fp", {})
    quantize(model, RTN(bits=4, group_size=64))
    save_checkpoint(model, tokenizer, tmp_path / "q4", {})
    linear_fp = 2 * (4 * 256 * 256 + 3 * 256 * 512) * 4
    saved = (tmp_path / "fp/model.safetensors").stat().st_size - (
        tmp_path / "q4/model.safetensors"
    ).stat().st_size
    assert saved > 0.85 * linear_fp  # 4.3 of 32 bits kept: ~87% of the linear bytes saved


def test_output_dir_must_be_empty(tmp_path: Path, tokenizer):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="--overwrite"):
        save_checkpoint(tiny_model(vocab=len(tokenizer)), tokenizer, tmp_path / "out", {})
    assert (tmp_path / "out" / "x").read_text() == "keep me"


def test_killed_run_leaves_no_checkpoint(tmp_path: Path, tokenizer, monkeypatch):
    import tinyllm.checkpoint as ck

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model(vocab=len(tokenizer)), tokenizer, tmp_path / "out", {})
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # the temporary directory is cleaned up too


def test_bad_settings():
    with pytest.raises(ValidationError, match="bits"):
        RTN(bits=6)
    with pytest.raises(ValidationError, match="group_size"):
        GPTQ(group_size=48)
    with pytest.raises(ValidationError):
        RTN(bits=4, colour="red")


def test_group_that_does_not_divide(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    with pytest.raises(ConfigError, match="does not divide the 96 input features"):
        quantize(model, RTN(bits=4, group_size=64))


def test_no_linear_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.ReLU()) for _ in range(2)])

    with pytest.raises(Exception, match=r"no decoder blocks|no float linear"):
        quantize(Net(), RTN())


def test_calibration_too_small(tokenizer, corpus_file):
    from tinyllm.data.calibration import calibration_windows
    from tinyllm.errors import CorpusError

    with pytest.raises(CorpusError, match="too small"):
        calibration_windows(tokenizer, corpus_file, samples=128, seq_len=512)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GPTQ(bits=4, group_size=32),
        lambda: GPTQ(bits=4, group_size=32, true_sequential=True, float_targets=0.25),
        lambda: AWQ(base=RTN(group_size=32)),
        lambda: Mixed(base=GPTQ(group_size=32), bits=[3, 4], avg_bits=3.5),
        lambda: Int8Static(),
        lambda: SmoothQuant(),
    ],
    ids=["gptq", "gptq-staged-ft", "awq", "mixed", "int8-static", "smoothquant"],
)
def test_swapped_out_linears_are_freed_as_the_run_goes(make, monkeypatch):
    """Each block's float linears, once swapped for packed ones, are freed before the next
    block: nothing in the glue holds them (holding them kept every replaced float weight,
    14 MB per SmolLM2 block, alive until the end of the run)."""
    model = tiny_model()
    anatomy = analyze(model)
    refs = [[weakref.ref(s.module) for s in anatomy.linears if s.block == i] for i in range(2)]
    del anatomy
    alive_after: list[list[int]] = []
    real = calib_mod.make_progress

    class Watch:
        def __init__(self):
            self.bar = real()

        def __enter__(self):
            self.inner = self.bar.__enter__()
            return self

        def __exit__(self, *exc):
            return self.bar.__exit__(*exc)

        def add_task(self, *a, **k):
            return self.inner.add_task(*a, **k)

        def update(self, task, **k):
            gc.collect()
            alive_after.append([sum(r() is not None for r in block) for block in refs])
            return self.inner.update(task, **k)

    monkeypatch.setattr(calib_mod, "make_progress", Watch)
    quantize(model, make(), calib=torch.randint(0, 320, (8, 64)))
    assert len(alive_after) == 2
    assert alive_after[0][0] == 0 and alive_after[0][1] == len(refs[1])  # block 0 freed
    assert alive_after[1] == [0, 0]
