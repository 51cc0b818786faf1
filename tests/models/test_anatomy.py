import pytest
from torch import nn

from tests.conftest import FAMILIES, tiny_model
from tinyllm.errors import ArchitectureError
from tinyllm.models.anatomy import analyze, find_blocks

EXPECTED_ROLES = {
    "llama": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen2": {"q", "k", "v", "o", "gate", "up", "down"},
    "mistral": {"q", "k", "v", "o", "gate", "up", "down"},
    "gemma3": {"q", "k", "v", "o", "gate", "up", "down"},
    "phi3": {"qkv", "o", "gate_up", "down"},
    "opt": {"q", "k", "v", "o", "fc1", "fc2"},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_anatomy_finds_blocks_linears_norms_embeddings(family):
    model = tiny_model(family)
    a = analyze(model)
    assert len(a.blocks) == 2
    for i in range(2):
        assert {s.role for s in a.block_linears(i)} == EXPECTED_ROLES[family]
    assert all(s.name.startswith(a.blocks_path) for s in a.linears)
    assert all(isinstance(s.module, nn.Linear) for s in a.linears)
    assert a.embedding is model.get_input_embeddings()
    assert a.head is model.get_output_embeddings()
    assert len(a.norms) >= 2 * 2 + 1  # two per block at least, plus the final norm
    weights = sum(s.module.weight.numel() for s in a.linears)
    assert a.num_linear_weights == weights


def test_attention_and_mlp_split():
    a = analyze(tiny_model("llama"))
    attn = [s.role for s in a.block_linears(0) if s.is_attention]
    assert attn == ["q", "k", "v", "o"]


def test_structural_fallback_for_unknown_names():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 24)
            self.b = nn.Linear(16, 8)

    class Ffn(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Linear(8, 32)
            self.y = nn.Linear(32, 8)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attn()
            self.ffn = Ffn()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(3)])

    roles = [s.role for s in analyze(Net()).block_linears(0)]
    assert roles == ["attn_in", "attn_out", "mlp_in", "mlp_out"]


def test_no_blocks_is_a_clear_error():
    with pytest.raises(ArchitectureError, match="no decoder blocks"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
