"""Hostile model directories: every one is refused with a clear ModelLoadError before any weight
is allocated, naming what is wrong."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

import tinyllm
from tests.conftest import tiny_model
from tinyllm.checkpoint import TINYLLM_CONFIG, WEIGHTS, save_checkpoint
from tinyllm.errors import ModelLoadError
from tinyllm.quant.api import quantize
from tinyllm.quant.rtn import RTN

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture
def ckpt(tmp_path: Path, tokenizer) -> Path:
    """A tinyllm checkpoint of a 4-bit RTN tiny Llama."""
    model = tiny_model(vocab=len(tokenizer))
    quantize(model, RTN(bits=4, group_size=32))
    return save_checkpoint(model, tokenizer, tmp_path / "q4", {"steps": []})


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def _no_float_alloc(monkeypatch) -> None:
    """Fail the test if a real model is built (the checks must come first)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was allocated before the checks refused the directory")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


# -- absurd and mismatched sizes


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", 10**9), ("num_hidden_layers", 10**6), ("vocab_size", 10**12)],
)
@pytest.mark.parametrize("kind", ["hf", "tinyllm"])
def test_absurd_config_sizes(tiny_dir: Path, ckpt: Path, kind: str, field: str, value: int):
    directory = tiny_dir if kind == "hf" else ckpt
    _edit_json(directory / "config.json", **{field: value})
    with pytest.raises(ModelLoadError, match=rf"{field} = {value} is outside"):
        tinyllm.load(directory)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "hidden_size",
            4096,
            r"(embed_tokens|lm_head).weight is stored as \[\d+, 64\].*hidden_size = 4096",
        ),
        ("intermediate_size", 1000, r"mlp.*is stored as .*intermediate_size = 1000"),
        ("num_hidden_layers", 9, r"lack .* tensors .*num_hidden_layers = 9 .* hold 2 blocks"),
        ("vocab_size", 5000, r"(embed_tokens|lm_head).weight is stored as .*vocab_size = 5000"),
    ],
)
@pytest.mark.parametrize("kind", ["hf", "tinyllm"])
def test_config_sizes_checked_against_the_tensors(
    tiny_dir: Path, ckpt: Path, kind: str, field: str, value: int, message: str, monkeypatch
):
    directory = tiny_dir if kind == "hf" else ckpt
    _edit_json(directory / "config.json", **{field: value})
    _no_float_alloc(monkeypatch)
    with pytest.raises(ModelLoadError, match=message):
        tinyllm.load(directory)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"hidden_size": "64"}, "hidden_size must be an integer"),
        ({"model_type": "vit"}, "cannot build a 'vit' causal language model"),
        ({"model_type": None}, "has no model_type"),
    ],
    ids=["size-not-an-integer", "architecture-without-a-causal-lm", "no-model-type"],
)
def test_config_fields_refused(tiny_dir: Path, edit: dict, message: str):
    _edit_json(tiny_dir / "config.json", **edit)
    with pytest.raises(ModelLoadError, match=message):
        tinyllm.load(tiny_dir)


def test_unreadable_config(tiny_dir: Path):
    (tiny_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json is unreadable"):
        tinyllm.load(tiny_dir)


def test_absurd_quantized_record_shape(ckpt: Path):
    info = json.loads((ckpt / TINYLLM_CONFIG).read_text())
    name = next(iter(info["quantized"]))
    info["quantized"][name]["shape"] = [10**6, 10**6]
    (ckpt / TINYLLM_CONFIG).write_text(json.dumps(info))
    with pytest.raises(
        ModelLoadError, match=rf"layer {name} \(1000000x1000000, 4 bits\) needs 500000000000 packed"
    ):
        tinyllm.load(ckpt, verify=False)


def test_packed_codes_must_match_the_record(ckpt: Path):
    info = json.loads((ckpt / TINYLLM_CONFIG).read_text())
    name = next(iter(info["quantized"]))
    info["quantized"][name]["bits"] = 8  # the file holds 4-bit codes
    (ckpt / TINYLLM_CONFIG).write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match=rf"{name} .*8 bits\) needs \d+ packed bytes"):
        tinyllm.load(ckpt)


# -- tinyllm.json schema


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda i, n: i["quantized"][n].update(bits="4"), r"quantized\..*\.bits: .*integer"),
        (lambda i, n: i["quantized"][n].update(bits=99), r"quantized\..*\.bits: .*less than"),
        (lambda i, n: i["quantized"][n].pop("shape"), r"quantized\..*\.shape: Field required"),
        (lambda i, n: i.update(tied_embeddings="yes"), r"tied_embeddings: .*boolean"),
        (lambda i, n: i.update(sparse={"x.weight": [1]}), r"sparse\.x\.weight"),
    ],
)
def test_tinyllm_json_schema_names_the_field(ckpt: Path, edit, message: str):
    info = json.loads((ckpt / TINYLLM_CONFIG).read_text())
    edit(info, next(iter(info["quantized"])))
    (ckpt / TINYLLM_CONFIG).write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match=rf"tinyllm.json is invalid: .*{message}"):
        tinyllm.load(ckpt)


def test_unknown_format_version(ckpt: Path):
    _edit_json(ckpt / TINYLLM_CONFIG, format=7)
    with pytest.raises(ModelLoadError, match="unknown tinyllm format 7"):
        tinyllm.load(ckpt)


# -- truncated files and digests


def test_truncated_checkpoint(ckpt: Path):
    f = ckpt / WEIGHTS
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"truncated|not a readable"):
        tinyllm.load(ckpt)


def test_digest_recorded_and_verified(ckpt: Path, tokenizer):
    from tinyllm.util.fs import sha256_file

    digests = json.loads((ckpt / TINYLLM_CONFIG).read_text())["digests"]
    assert digests == {WEIGHTS: sha256_file(ckpt / WEIGHTS)}
    x = torch.randint(0, len(tokenizer), (1, 8))
    clean = _logits(tinyllm.load(ckpt)[0], x)
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data: the header still parses
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as info:
        tinyllm.load(ckpt)
    message = str(info.value)
    assert WEIGHTS in message and digests[WEIGHTS] in message
    assert sha256_file(ckpt / WEIGHTS) in message and "--no-verify" in message
    changed = _logits(tinyllm.load(ckpt, verify=False)[0], x)  # skipping loads the changed file
    assert changed.shape == clean.shape


def test_corrupt_recorded_digest(ckpt: Path):
    _edit_json(ckpt / TINYLLM_CONFIG, digests={WEIGHTS: "0" * 64})
    with pytest.raises(ModelLoadError, match=rf"{WEIGHTS} is not the file .*expects 0{{64}}"):
        tinyllm.load(ckpt)
    tinyllm.load(ckpt, verify=False)


def test_no_verify_default_for_the_cli(ckpt: Path, monkeypatch):
    load_mod = importlib.import_module("tinyllm.core.load")

    _edit_json(ckpt / TINYLLM_CONFIG, digests={WEIGHTS: "0" * 64})
    monkeypatch.setattr(load_mod, "_verify_default", True)
    load_mod.set_verify_default(False)
    tinyllm.load(ckpt)
    with pytest.raises(ModelLoadError, match="sha256"):
        tinyllm.load(ckpt, verify=True)  # an explicit argument wins


def test_checkpoint_without_digests_still_loads(ckpt: Path, tokenizer, caplog):
    x = torch.randint(0, len(tokenizer), (1, 8))
    ref = _logits(tinyllm.load(ckpt)[0], x)
    _edit_json(ckpt / TINYLLM_CONFIG, digests=None)
    with caplog.at_level("DEBUG", logger="tinyllm.checkpoint"):
        back, _ = tinyllm.load(ckpt)
    assert "no weight digests" in caplog.text
    assert torch.equal(_logits(back, x), ref)


# -- custom code and tokenizers


def _custom_code(directory: Path, model_type: str) -> Path:
    sentinel = directory / "code-ran"
    (directory / "modeling_evil.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\nclass EvilConfig: pass\n"
    )
    auto_map = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.M"}
    _edit_json(directory / "config.json", model_type=model_type, auto_map=auto_map)
    return sentinel


@pytest.mark.parametrize("kind", ["hf", "tinyllm"])
def test_custom_code_is_refused(tiny_dir: Path, ckpt: Path, kind: str):
    directory = tiny_dir if kind == "hf" else ckpt
    sentinel = _custom_code(directory, "evil")
    with pytest.raises(ModelLoadError, match=r"needs the custom code .*trust_remote_code"):
        tinyllm.load(directory)
    assert not sentinel.exists()


def test_auto_map_of_a_known_architecture_uses_the_builtin_code(tiny_dir: Path, tokenizer):
    sentinel = _custom_code(tiny_dir, "llama")
    model, _ = tinyllm.load(tiny_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not sentinel.exists()


def test_custom_tokenizer_code_is_not_run(tiny_dir: Path):
    sentinel = tiny_dir / "code-ran"
    (tiny_dir / "tokenization_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n")
    _edit_json(
        tiny_dir / "tokenizer_config.json",
        tokenizer_class="EvilTokenizer",
        auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
    )
    with pytest.raises(ModelLoadError, match="cannot load a tokenizer"):
        tinyllm.load(tiny_dir)
    assert not sentinel.exists()


@pytest.mark.parametrize("kind", ["hf", "tinyllm"])
def test_missing_tokenizer(tiny_dir: Path, ckpt: Path, kind: str):
    directory = tiny_dir if kind == "hf" else ckpt
    for name in TOKENIZER_FILES:
        (directory / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match=r"has no tokenizer .*copy the tokenizer files"):
        tinyllm.load(directory, verify=False)


def test_garbage_tokenizer(tiny_dir: Path):
    (tiny_dir / "tokenizer.json").write_text("{garbage")
    with pytest.raises(ModelLoadError, match="cannot load a tokenizer"):
        tinyllm.load(tiny_dir)


def test_tokenizer_of_a_bigger_model(tmp_path: Path, tokenizer):
    out = tmp_path / "m"
    tiny_model(vocab=64).save_pretrained(out)  # 64 embedding rows, the tokenizer has ~320
    tokenizer.save_pretrained(out)
    with pytest.raises(ModelLoadError, match=r"tokenizer has \d+ tokens but .* 64 rows"):
        tinyllm.load(out)
