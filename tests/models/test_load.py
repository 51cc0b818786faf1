"""Loading from every kind of spec, and a clear error for every kind of bad one."""

from pathlib import Path

import numpy as np
import pytest
import torch

import tinyllm
from tinyllm.errors import ModelLoadError, ModelNotFoundError
from tinyllm.models.load import resolve


def test_hf_dir_round_trip(tiny_dir: Path):
    model, tok = tinyllm.load(tiny_dir)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_loaded_weights_do_not_map_the_file(tiny_dir: Path):
    """A loaded model owns its weights: no tensor is a view of the safetensors file mapping
    (whose pages would stay resident while compression replaces the weights), ties kept."""
    model, _ = tinyllm.load(tiny_dir)
    weights = str((tiny_dir / "model.safetensors").resolve())
    maps = Path("/proc/self/maps").read_text().splitlines()
    assert not any(line.rstrip().endswith(weights) for line in maps)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    x = torch.randint(0, 50, (1, 8))
    back, _ = tinyllm.load(tiny_dir)
    with torch.no_grad():
        assert torch.equal(model(x).logits, back(x).logits)


def test_missing_path_names_the_registered_models():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        resolve("/no/such/model")


def test_directory_without_model(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="no model in it"):
        tinyllm.load(tmp_path)


def test_file_that_is_not_a_model(tmp_path: Path):
    path = tmp_path / "weights.txt"
    path.write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a model file"):
        tinyllm.load(path)


def test_pickle_weights_are_refused(tiny_dir: Path):
    for f in tiny_dir.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="safetensors only"):
        tinyllm.load(tiny_dir)


def test_truncated_safetensors(tiny_dir: Path):
    f = next(tiny_dir.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"truncated|not a readable"):
        tinyllm.load(tiny_dir)


def test_corrupted_safetensors_header(tiny_dir: Path):
    f = next(tiny_dir.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00" * 32  # clobber the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        tinyllm.load(tiny_dir)


def test_weights_of_another_architecture(tiny_dir: Path, tokenizer):
    from tests.conftest import tiny_model

    other = tiny_model("opt", vocab=len(tokenizer))
    for f in tiny_dir.glob("*.safetensors"):
        f.unlink()
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in other.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tiny_dir / "model.safetensors")
    with pytest.raises(ModelLoadError):
        tinyllm.load(tiny_dir)


def _write_gguf(path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_truncated_gguf(tmp_path: Path):
    path = tmp_path / "model.gguf"
    _write_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        tinyllm.load(path)


def test_gguf_detected_by_magic(tmp_path: Path):
    path = tmp_path / "model.bin"
    _write_gguf(path)
    assert resolve(path).kind == "gguf"
