"""Streaming compression (one block in memory) gives the checkpoint the in-memory path gives:
the same tensors, key by key, for every step registry.STREAMS names; the sharded checkpoint
loads back; bad requests are refused clearly. An interrupted streamed run resumes from its last
finished block and writes what an uninterrupted run writes (core/resume.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from tinyllm.core.compress import Calibration, compress
from tinyllm.core.placement import Streaming
from tinyllm.core.registry import STREAMS, step_class
from tinyllm.core.resume import ACTIVATIONS, JOURNAL
from tinyllm.errors import ConfigError
from tinyllm.quant.gptq import GPTQ

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LINEARS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# Small settings per step: group sizes the 64/128-wide tiny model divides.
SETTINGS = {
    "gptq": {"bits": 4, "group_size": 32},
    "awq": {},
    "rtn": {"bits": 4, "group_size": 32},
    "nf4": {"block_size": 32},
    "wanda": {"sparsity": 0.5},
    "sparsegpt": {"sparsity": 0.5},
    "smoothquant": {},
    "int8-static": {},
    "channels": {"ratio": 0.25},
    "heads": {"count": 1},
    "blocks": {"count": 1},
    # a given allocation (tinyllm plan): every other layer at 8 bits
    "mixed": {
        "base": GPTQ(bits=4, group_size=32),
        "bits": [4, 8],
        "allocation": {
            f"model.layers.{i}.{m}": 8 if (i + k) % 2 else 4
            for i in range(3)
            for k, m in enumerate(LINEARS)
        },
    },
}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _step(name: str):
    return step_class(name)(**SETTINGS[name])


@pytest.fixture
def four_block_dir(tmp_path: Path, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", vocab=len(tokenizer))
    cfg.num_hidden_layers = 3
    torch.manual_seed(1)
    out = tmp_path / "src"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def calib(corpus: Path) -> Calibration:
    return Calibration(corpus=str(corpus), samples=8, seq_len=64)


def test_registry_names_in_streams_are_steps() -> None:
    assert set(SETTINGS) == set(STREAMS)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_streamed_checkpoint_equals_in_memory(
    name: str, four_block_dir: Path, tmp_path: Path, calib: Calibration
):
    whole = compress(four_block_dir, [_step(name)], calib, tmp_path / "whole", stream="off")
    streamed = compress(four_block_dir, [_step(name)], calib, tmp_path / "streamed", stream="on")
    a, b = _tensors(whole.out), _tensors(streamed.out)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    info_a = json.loads((whole.out / "tinyllm.json").read_text())
    info_b = json.loads((streamed.out / "tinyllm.json").read_text())
    assert info_a["quantized"] == info_b["quantized"]
    assert info_a["sparse"] == info_b["sparse"]
    blocks = json.loads((streamed.out / "config.json").read_text())["num_hidden_layers"]
    assert blocks == (2 if name == "blocks" else 3)
    assert len(list(streamed.out.glob("model-*-of-*.safetensors"))) == blocks + 1  # + the rest
    assert (whole.out / "config.json").read_text() == (streamed.out / "config.json").read_text()
    index = json.loads((streamed.out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)


@pytest.mark.parametrize("first", ["wanda", "blocks", "channels"])
def test_two_streamed_steps_equal_in_memory(
    first: str, four_block_dir: Path, tmp_path: Path, calib: Calibration
) -> None:
    """Steps chain on a streamed model; after layer dropping (the stored blocks renumbered)
    and channel pruning (smaller tensors) too."""
    steps = [_step(first), _step("gptq")]
    whole = compress(four_block_dir, steps, calib, tmp_path / "whole", stream="off")
    streamed = compress(four_block_dir, steps, calib, tmp_path / "streamed", stream="on")
    a, b = _tensors(whole.out), _tensors(streamed.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_loads_back_and_predicts_like_the_whole(
    four_block_dir: Path, tmp_path: Path, calib: Calibration
) -> None:
    from tinyllm.core.load import load

    whole = compress(four_block_dir, [_step("gptq")], calib, tmp_path / "w", stream="off")
    streamed = compress(four_block_dir, [_step("gptq")], calib, tmp_path / "s", stream="on")
    ids = torch.arange(20).reshape(1, 20)
    m1, _ = load(whole.out)
    m2, _ = load(streamed.out)
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)
    assert not list(tmp_path.glob("*.stream*"))  # the work directory is gone


def test_stream_on_refuses_steps_that_need_the_whole_model(
    four_block_dir: Path, tmp_path, calib: Calibration
):
    from tinyllm.prune.magnitude import Magnitude

    with pytest.raises(ConfigError, match="cannot stream: magnitude"):
        compress(four_block_dir, [Magnitude(sparsity=0.5)], calib, tmp_path / "o", stream="on")
    from tinyllm.prune.structured import Channels

    with pytest.raises(ConfigError, match="channels: importance gradient needs a backward"):
        compress(
            four_block_dir, [Channels(importance="gradient")], calib, tmp_path / "o", stream="on"
        )
    with pytest.raises(ConfigError, match="stream must be one of"):
        compress(four_block_dir, [_step("rtn")], calib, tmp_path / "o", stream="sometimes")


def test_bfloat16_source_streams_with_float32_compute(
    four_block_dir: Path, tmp_path: Path, calib: Calibration
):
    """A bf16 checkpoint (how large models ship): embeddings stay bf16 in memory and on disk,
    blocks are computed in float32, and the result loads and runs."""
    from transformers import AutoModelForCausalLM

    from tinyllm.core.load import load

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(four_block_dir).to(torch.bfloat16).save_pretrained(src)
    for f in four_block_dir.glob("tok*"):
        (src / f.name).write_bytes(f.read_bytes())
    res = compress(src, [_step("gptq")], calib, tmp_path / "q", stream="on")
    stored = _tensors(res.out)
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    model, _ = load(res.out)
    with torch.no_grad():
        logits = model(torch.arange(10).reshape(1, 10)).logits
    assert torch.isfinite(logits).all()


def test_inference_load_holds_codes_once_and_predicts_the_same(
    four_block_dir: Path, tmp_path: Path, calib: Calibration
) -> None:
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.core.load import load
    from tinyllm.kernels.qlinear import QuantLinear

    res = compress(four_block_dir, [_step("gptq")], calib, tmp_path / "q", stream="on")
    full, tok = load(res.out)
    lean, _ = load(res.out, inference=True)
    q4 = [m for m in lean.modules() if isinstance(m, QuantLinear) and m.kernel == "q4"]
    if not q4:
        pytest.skip("tinyllm's C++ 4-bit kernel is not built here")
    assert all(m.qweight.packed.is_meta for m in q4)
    ids = torch.arange(30).reshape(1, 30)
    with torch.no_grad():
        assert torch.equal(full(ids).logits, lean(ids).logits)
        assert torch.equal(full(ids[:, :3]).logits, lean(ids[:, :3]).logits)
    for a, b in zip(full.modules(), lean.modules(), strict=True):
        if isinstance(a, QuantLinear):
            assert torch.equal(a.dequantized_weight(), b.dequantized_weight())
    with pytest.raises(ConfigError, match="loaded for inference only"):
        save_checkpoint(lean, tok, tmp_path / "again", {})


def test_narrow_tables_compute_in_float32(
    four_block_dir: Path, tmp_path: Path, calib: Calibration, monkeypatch
) -> None:
    """dtype None keeps the large tables as stored (fp16 here) and the model still computes in
    float32 around them."""
    from tinyllm import checkpoint
    from tinyllm.checkpoint import load_checkpoint

    res = compress(four_block_dir, [_step("rtn")], calib, tmp_path / "q", stream="off")
    monkeypatch.setattr(checkpoint, "LARGE_FLOAT", 4096)  # the tiny 320 x 64 tables count
    wide, _ = load_checkpoint(res.out)
    narrow, _ = load_checkpoint(res.out, dtype=None)
    assert narrow.get_input_embeddings().weight.dtype == torch.float16
    ids = torch.arange(30).reshape(1, 30)
    with torch.no_grad():
        a, b = wide(ids).logits, narrow(ids).logits
    assert b.dtype == torch.float32
    assert torch.allclose(a, b, rtol=0, atol=2e-3 * a.abs().max())


def test_tied_embeddings_stream_like_in_memory(tmp_path: Path, tokenizer, calib: Calibration):
    """A model whose head is its embedding table (SmolLM2, Llama-3.2-1B): the checkpoint stores
    no head, the streamed one neither, and both hold the same tensors."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", vocab=len(tokenizer))
    cfg.tie_word_embeddings = True
    torch.manual_seed(2)
    src = tmp_path / "tied"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    tokenizer.save_pretrained(src)
    for name in ("gptq", "rtn"):
        whole = compress(src, [_step(name)], calib, tmp_path / f"w-{name}", stream="off")
        streamed = compress(src, [_step(name)], calib, tmp_path / f"s-{name}", stream="on")
        a, b = _tensors(whole.out), _tensors(streamed.out)
        assert "lm_head.weight" not in b and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        info = json.loads((streamed.out / "tinyllm.json").read_text())
        assert info["tied_embeddings"] is True


# --- resuming an interrupted streamed run ------------------------------------------------
class _Killed(Exception):
    pass


def _interrupt_after(monkeypatch, blocks: int) -> None:
    """Make the streamed run fail while it leaves block `blocks` (after `blocks` finished)."""
    real = Streaming.leave

    def leave(self, i, block):
        if i == blocks:
            raise _Killed
        real(self, i, block)

    monkeypatch.setattr(Streaming, "leave", leave)


@pytest.mark.parametrize("name", ["gptq", "rtn", "awq"])
def test_a_resumed_run_writes_the_uninterrupted_runs_checkpoint(
    name,
    four_block_dir: Path,
    tmp_path: Path,
    calib: Calibration,
    monkeypatch,
):
    full = compress(four_block_dir, [_step(name)], calib, tmp_path / "full", stream="on")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(_Killed):
            compress(four_block_dir, [_step(name)], calib, out, stream="on")
    work = Path(f"{out}.stream0")
    state = json.loads((work / JOURNAL).read_text())
    assert state["done"] == 2 and (work / ACTIVATIONS).is_file() and not out.exists()
    left = []
    real = Streaming.leave
    with monkeypatch.context() as m:  # count the blocks the resumed run compresses
        m.setattr(Streaming, "leave", lambda self, i, b: (left.append(i), real(self, i, b)))
        resumed = compress(four_block_dir, [_step(name)], calib, out, stream="on", resume=True)
    assert left == [2]  # only the unfinished block
    a, b = _tensors(full.out), _tensors(resumed.out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.report["layer_errors"] == full.report["layer_errors"]  # blocks 0-1 too
    assert not work.exists()  # cleaned once the output is written


def test_resume_refuses_another_runs_record(
    four_block_dir: Path,
    tmp_path: Path,
    calib: Calibration,
    monkeypatch,
):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(_Killed):
            compress(four_block_dir, [GPTQ(bits=4, group_size=32)], calib, out, stream="on")
    with pytest.raises(ConfigError, match="other settings"):
        compress(
            four_block_dir, [GPTQ(bits=3, group_size=32)], calib, out, stream="on", resume=True
        )
    bf16 = Calibration(corpus=calib.corpus, samples=8, seq_len=64, dtype="bfloat16")
    with pytest.raises(ConfigError, match="other settings"):  # (the forwards' dtype)
        compress(four_block_dir, [GPTQ(bits=4, group_size=32)], bf16, out, stream="on", resume=True)
    other = Calibration(corpus=calib.corpus, samples=8, seq_len=64, seed=1)
    with pytest.raises(ConfigError, match="other calibration"):
        compress(
            four_block_dir, [GPTQ(bits=4, group_size=32)], other, out, stream="on", resume=True
        )


def test_runs_that_cannot_resume_start_over(
    four_block_dir: Path,
    tmp_path: Path,
    calib: Calibration,
    monkeypatch,
    caplog,
):
    """SmoothQuant keeps a model-wide choice across blocks: no record is kept, a failed run
    leaves nothing behind, and --resume starts from block 0 with a warning."""
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(_Killed):
            compress(four_block_dir, [_step("smoothquant")], calib, out, stream="on")
    assert not Path(f"{out}.stream0").exists()
    with caplog.at_level(logging.WARNING):
        done = compress(
            four_block_dir, [_step("smoothquant")], calib, out, stream="on", resume=True
        )
    assert done.out == out and "starting the streamed run from block 0" in caplog.text


def test_cli_quantize_resume(four_block_dir: Path, tmp_path: Path, corpus: Path, monkeypatch):
    """`tinyllm quantize --stream on` interrupted keeps its work and says how to continue;
    `--resume` continues it (one block left) and writes the checkpoint."""
    from typer.testing import CliRunner

    from tinyllm.cli import app

    out = tmp_path / "q"
    args = ["quantize", str(four_block_dir), "--method", "rtn", "--group-size", "32"]
    args += ["--stream", "on", "-o", str(out)]
    runner = CliRunner()
    assert "--resume" in runner.invoke(app, ["quantize", "--help"], env={"COLUMNS": "200"}).output
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        failed = runner.invoke(app, args)
    assert failed.exit_code != 0 and Path(f"{out}.stream0", JOURNAL).is_file()
    left = []
    real = Streaming.leave
    monkeypatch.setattr(Streaming, "leave", lambda self, i, b: (left.append(i), real(self, i, b)))
    done = runner.invoke(app, [*args, "--resume"])
    assert done.exit_code == 0, done.output
    assert left == [2] and (out / "tinyllm.json").is_file()


def test_cli_prune_blocks_streamed_reports_the_shapes_left(
    four_block_dir: Path, tmp_path: Path, corpus: Path
):
    """`tinyllm prune --method blocks --stream on` says what it left (a structured method has no
    layer sparsity to report), and `--importance gradient` is refused with the reason."""
    from typer.testing import CliRunner

    from tinyllm.cli import app

    args = ["prune", str(four_block_dir), "--calib-corpus", str(corpus), "--samples", "4"]
    args += ["--seq-len", "32", "--stream", "on"]
    runner = CliRunner()
    done = runner.invoke(
        app, [*args, "--method", "blocks", "--count", "1", "-o", str(tmp_path / "b")]
    )
    assert done.exit_code == 0, done.output
    assert "now 2 blocks, FFN width 128, 2 KV heads" in " ".join(done.output.split())
    refused = runner.invoke(
        app, [*args, "--method", "channels", "--importance", "gradient", "-o", str(tmp_path / "c")]
    )
    assert isinstance(refused.exception, ConfigError) and "backward pass" in str(refused.exception)


def test_a_pruned_checkpoint_streams_into_the_in_memory_result(
    four_block_dir: Path, tmp_path: Path, calib: Calibration
) -> None:
    """A recipe's second stage starts from a tinyllm checkpoint: a pruned one (sparse layers
    stored as bitmask + values) streams, block by block, into the checkpoint the in-memory path
    writes from it. A quantized one is refused under --stream on (and loaded whole by auto)."""
    pruned = compress(four_block_dir, [_step("wanda")], calib, tmp_path / "p", stream="off")
    assert json.loads((pruned.out / "tinyllm.json").read_text())["sparse"]
    whole = compress(pruned.out, [_step("gptq")], calib, tmp_path / "whole", stream="off")
    streamed = compress(pruned.out, [_step("gptq")], calib, tmp_path / "streamed", stream="on")
    a, b = _tensors(whole.out), _tensors(streamed.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((streamed.out / "tinyllm.json").read_text())
    assert [s["type"] for s in info["steps"]] == ["wanda", "gptq"] and info["stream"]
    with pytest.raises(ConfigError, match="is quantized"):
        compress(whole.out, [_step("rtn")], calib, tmp_path / "again", stream="on")


def test_mixed_streams_from_cached_sensitivities(
    four_block_dir: Path, tmp_path: Path, calib: Calibration
) -> None:
    """Sensitivities measured in memory into --sensitivity-cache let the same mixed run stream
    (the base quantizer goes over the blocks) and give the in-memory checkpoint; without them a
    streamed run is refused with what to do."""
    from tinyllm.quant.mixed import Mixed

    cache = tmp_path / "sens.json"
    step = Mixed(base=GPTQ(bits=4, group_size=32), bits=[3, 4, 8], avg_bits=5.0)
    cached = step.model_copy(update={"sensitivity_cache": str(cache)})
    with pytest.raises(ConfigError, match="measuring KL sensitivities"):
        compress(four_block_dir, [step], calib, tmp_path / "x", stream="on")
    with pytest.raises(ConfigError, match="stream off to fill"):
        compress(four_block_dir, [cached], calib, tmp_path / "y", stream="on")
    whole = compress(four_block_dir, [cached], calib, tmp_path / "whole", stream="off")
    assert cache.is_file()
    streamed = compress(four_block_dir, [cached], calib, tmp_path / "streamed", stream="on")
    assert streamed.meta.get("stream")
    a, b = _tensors(whole.out), _tensors(streamed.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.report["bit_allocation"] == streamed.report["bit_allocation"]


def test_mixed_with_block_sensitivities_streams_and_equals_in_memory(
    four_block_dir: Path, tmp_path: Path, calib: Calibration
) -> None:
    """--sensitivity block measures in one pass over the blocks, so a streamed model measures it
    itself: the same sensitivities, allocation and tensors as in memory."""
    from tinyllm.quant.mixed import Mixed

    step = Mixed(base=GPTQ(bits=4, group_size=32), bits=[3, 4, 8], avg_bits=5.0,
                 sensitivity="block")  # fmt: skip
    assert step.whole_model() is None
    whole = compress(four_block_dir, [step], calib, tmp_path / "whole", stream="off")
    streamed = compress(four_block_dir, [step], calib, tmp_path / "streamed", stream="on")
    assert streamed.meta.get("stream")
    assert whole.report["sensitivity"] == streamed.report["sensitivity"]
    alloc = whole.report["bit_allocation"]
    assert alloc == streamed.report["bit_allocation"] and len(set(alloc.values())) > 1
    a, b = _tensors(whole.out), _tensors(streamed.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
