"""models/families.py: the one table of model families, checked against real module graphs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_model
from tinyllm.errors import ModelLoadError
from tinyllm.models.families import FAMILIES, derived_family, family_of, supporting

TABLE = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gemma3": "gemma3_text"}


@pytest.mark.parametrize("family", list(TABLE))
def test_every_role_names_a_module_of_the_family(family: str):
    """Each role, the scaling groups' members and the top-level names exist in a real model."""
    model = tiny_model(family)
    fam = family_of(model)
    assert fam is FAMILIES[TABLE[family]]
    block = dict(model.model.layers[0].named_modules())
    assert all(local in block for local in fam.roles.values())
    assert fam.scaling_groups(), "every family in the table can fold scales somewhere"
    for prev, consumers in fam.scaling_groups():
        assert prev in block and all(c in block for c in consumers)
    for name in (fam.embed, fam.final_norm, fam.head):
        model.get_submodule(name)


def test_gguf_names_cover_every_parameter_of_a_block():
    """The GGUF templates name each module of a block that holds parameters."""
    for family, model_type in TABLE.items():
        model = tiny_model(family)
        names = FAMILIES[model_type].gguf_block_names()
        with_params = {
            n for n, m in model.model.layers[0].named_modules() if list(m.parameters(False))
        }
        assert with_params <= set(names), (family, with_params - set(names))
        assert names["self_attn.q_proj"].format(bid=3) == "blk.3.attn_q"


def test_gemma3_scales_through_its_pre_feedforward_norm():
    groups = dict(FAMILIES["gemma3_text"].scaling_groups())
    assert groups["pre_feedforward_layernorm"] == ["mlp.gate_proj", "mlp.up_proj"]
    assert "post_attention_layernorm" not in groups  # it norms the attention output, not an input
    assert FAMILIES["gemma3_text"].norm_offset == 1.0


def test_support_lists():
    assert supporting("runtime") == ["llama", "qwen2", "mistral", "gemma3_text"]
    assert sorted(supporting("onnx")) == ["llama", "mistral", "qwen2"]
    assert sorted(supporting("gguf")) == ["gemma3_text", "llama", "mistral", "qwen2"]


@pytest.mark.parametrize("family", ["phi3", "opt"])
def test_a_family_outside_the_table_is_derived_from_its_graph(family: str):
    """Only roles whose modules exist; nothing exported or run by the lean runtime."""
    model = tiny_model(family)
    fam = family_of(model)
    assert fam == derived_family(model)
    assert fam.model_type == model.config.model_type
    block = dict(model.model.decoder.layers[0].named_modules()) if family == "opt" else None
    block = block or dict(model.model.layers[0].named_modules())
    assert all(local in block for local in fam.roles.values())
    assert fam.gguf is None and not fam.onnx and not fam.runtime
    if family == "phi3":  # fused qkv_proj: only the norms, o and down keep Llama names
        assert "q" not in fam.roles and fam.roles["o"] == "self_attn.o_proj"


def test_models_load_refuses_a_checkpoint_and_names_tinyllm_load(tmp_path: Path):
    """models.load (layer 2) cannot build packed layers; it says which loader can."""
    from tinyllm.models.load import TINYLLM_CONFIG, load

    (tmp_path / TINYLLM_CONFIG).write_text("{}")
    with pytest.raises(ModelLoadError, match=r"tinyllm\.load \(tinyllm\.core\.load\.load\)"):
        load(tmp_path)


def test_the_runtime_reads_the_sliding_window_rule_from_the_table():
    """Mistral's window applies to every layer; Qwen2 with its window switched on falls back."""
    from tinyllm.runtime.model import LeanRuntime, unsupported_reason

    mistral = tiny_model("mistral")
    mistral.config.sliding_window = 7
    assert unsupported_reason(mistral) is None
    assert LeanRuntime(mistral).window == 7
    qwen = tiny_model("qwen2")
    assert LeanRuntime(qwen).window is None
    qwen.config.use_sliding_window = True
    assert "sliding window" in unsupported_reason(qwen)
