"""Block keyword arguments captured on one sequence, used for whole batches by broadcasting."""

import pytest
import torch
from torch import nn

from tests.conftest import tiny_model
from tinyllm.core.calib import _block_kwargs, _capture_kwargs, run_block
from tinyllm.models.anatomy import analyze


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@torch.no_grad()
def test_one_sequence_kwargs_give_every_block_the_same_outputs(family):
    model = tiny_model(family).eval()
    blocks = analyze(model).blocks
    batch = torch.randint(0, 320, (4, 24))
    whole, one = _capture_kwargs(model, blocks, batch), _block_kwargs(model, blocks, batch)
    assert len(one) == len(whole) == len(blocks)
    assert one[-1]["position_ids"].shape[0] == 1  # captured on one sequence, not four
    x = torch.randn(4, 24, model.config.hidden_size)
    for block, kw_whole, kw_one in zip(blocks, whole, one, strict=True):
        assert kw_one.keys() == kw_whole.keys()
        assert torch.equal(run_block(block, x, kw_one), run_block(block, x, kw_whole))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, hidden_states, offset=None):
        return self.lin(hidden_states) + offset


class _PerSequence(nn.Module):
    """Its blocks get a keyword argument that differs between sequences (as a padding mask
    would)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.layers = nn.Embedding(10, 4), nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids, use_cache=False):
        h, offset = self.embed(input_ids), input_ids[..., None].float()
        for layer in self.layers:
            h = layer(h, offset=offset)
        return h


@torch.no_grad()
def test_kwargs_that_differ_between_sequences_are_captured_on_the_whole_batch():
    model = _PerSequence()
    batch = torch.tensor([[1, 2, 3], [4, 5, 6]])
    kwargs = _block_kwargs(model, list(model.layers), batch)
    for kw in kwargs:
        assert torch.equal(kw["offset"], batch[..., None].float())
