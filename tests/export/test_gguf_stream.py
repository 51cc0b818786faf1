"""A streamed GGUF export (core.stream.BlockReader: one decoder block read at a time) writes
the file the in-memory export writes, byte for byte: float, packed, sparse, tied, quantized
embeddings, two families; it never holds two blocks; bad requests are refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import tiny_config
from tinyllm.cli import app
from tinyllm.core.compress import Calibration, compress
from tinyllm.core.stream import BlockReader
from tinyllm.errors import ConfigError
from tinyllm.export import export_model
from tinyllm.prune.wanda import Wanda
from tinyllm.quant.common import gguf_grid
from tinyllm.quant.embed import embed_step
from tinyllm.quant.gptq import GPTQ


def _source(tmp_path: Path, tokenizer, family: str = "llama", tied: bool = False) -> Path:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, vocab=len(tokenizer))
    if family == "llama":  # (a Gemma config lists its layers' types: it keeps its two)
        cfg.num_hidden_layers = 3
    cfg.tie_word_embeddings = tied
    torch.manual_seed(3)
    out = tmp_path / f"src-{family}-{tied}"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _same_file(spec: Path | str, tmp_path: Path, qtype: str, **options) -> Path:
    whole, streamed = tmp_path / "whole.gguf", tmp_path / "streamed.gguf"
    export_model(spec, whole, "gguf", qtype, overwrite=True, stream="off", **options)
    export_model(spec, streamed, "gguf", qtype, overwrite=True, stream="on", **options)
    assert whole.read_bytes() == streamed.read_bytes()
    return streamed


@pytest.fixture
def calib(corpus: Path) -> Calibration:
    return Calibration(corpus=str(corpus), samples=4, seq_len=64)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_float_model_streams_to_the_same_file(tmp_path: Path, tokenizer, tied: bool, qtype: str):
    _same_file(_source(tmp_path, tokenizer, tied=tied), tmp_path, qtype)


@pytest.mark.parametrize("tied", [False, True])
def test_packed_checkpoint_streams_to_the_same_file(
    tmp_path: Path, tokenizer, calib: Calibration, tied: bool
):
    src = _source(tmp_path, tokenizer, tied=tied)
    steps = [GPTQ(**gguf_grid("q4_0")), embed_step(8)]
    ckpt = compress(src, steps, calib, tmp_path / "q", stream="off").out
    _same_file(ckpt, tmp_path, "q4_0", strict=True)
    _same_file(ckpt, tmp_path, "auto")


def test_sharded_sparse_checkpoint_and_gemma_stream_to_the_same_file(
    tmp_path: Path, tokenizer, calib: Calibration
):
    src = _source(tmp_path, tokenizer)
    pruned = compress(src, [Wanda(sparsity=0.5)], calib, tmp_path / "p", stream="on").out
    assert len(list(pruned.glob("model-*-of-*.safetensors"))) == 4
    _same_file(pruned, tmp_path, "q8_0")
    _same_file(_source(tmp_path, tokenizer, family="gemma3"), tmp_path, "f16")


def test_reader_holds_one_block_at_a_time(tmp_path: Path, tokenizer, calib: Calibration):
    src = _source(tmp_path, tokenizer)
    ckpt = compress(src, [GPTQ(bits=4, group_size=32)], calib, tmp_path / "q", stream="off").out
    reader = BlockReader(ckpt)
    held = []

    def live_blocks() -> int:
        return sum(any(not t.is_meta for t in b.state_dict().values()) for b in reader.blocks)

    enter = reader.enter

    def counting_enter(i: int):
        block = enter(i)
        held.append(live_blocks())
        return block

    reader.enter = counting_enter
    from tinyllm.export.gguf import export_gguf

    export_gguf(reader.model, reader.tokenizer, tmp_path / "r.gguf", "q4_1", reader=reader)
    assert held == [1, 1, 1] and live_blocks() == 0


def test_stream_on_is_refused_where_it_cannot_apply(tmp_path: Path, tokenizer):
    src = _source(tmp_path, tokenizer)
    with pytest.raises(ConfigError, match="GGUF only"):
        export_model(src, tmp_path / "m.onnx", "onnx", stream="on")
    with pytest.raises(ConfigError, match="unknown --stream"):
        export_model(src, tmp_path / "m.gguf", "gguf", stream="sometimes")
    r = CliRunner().invoke(
        app, ["export", str(src), "--type", "mix", "--stream", "on", "-o", str(tmp_path / "x.gguf")]
    )
    assert isinstance(r.exception, ConfigError) and "--stream on" in str(r.exception)


def test_cli_export_stream_on(tmp_path: Path, tokenizer):
    src = _source(tmp_path, tokenizer)
    out = tmp_path / "cli.gguf"
    r = CliRunner().invoke(app, ["export", str(src), "--stream", "on", "-o", str(out)])
    assert r.exit_code == 0, r.output
    ref = tmp_path / "ref.gguf"
    export_model(src, ref, "gguf", stream="off")
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_1", "iq4_nl", "q5_0"])
def test_tables_converted_in_row_chunks_give_the_same_bytes(
    tmp_path: Path, tokenizer, monkeypatch, qtype: str
):
    """A large float tensor is converted a few rows at a time (no float32 copy of a 128k
    table): every type quantizes rows on their own, so the bytes are those of one conversion."""
    from tinyllm.export import gguf

    src = _source(tmp_path, tokenizer)
    whole = tmp_path / "whole.gguf"
    export_model(src, whole, "gguf", qtype, embed_type=qtype)
    monkeypatch.setattr(gguf, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows: chunks that end mid-table
    chunked = tmp_path / "chunked.gguf"
    export_model(src, chunked, "gguf", qtype, embed_type=qtype)
    assert whole.read_bytes() == chunked.read_bytes()
