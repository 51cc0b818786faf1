import pytest
import torch
from torch import nn

from tests.conftest import tiny_model
from tests.quant.tiny import quantize_tiny_model
from tinyllm.kernels.qlinear import QuantLinear
from tinyllm.quant.api import quantize
from tinyllm.quant.awq import AWQ, _groups_for, fold_scale, search_clip, search_scale
from tinyllm.quant.gptq import GPTQ
from tinyllm.quant.rtn import RTN, rtn_quantize


def _assert_fold_keeps_function(producer: nn.Module, consumer: nn.Linear, x: torch.Tensor):
    """Folding a random scale between producer and consumer leaves consumer(producer(x))."""
    ref = consumer(producer(x))
    fold_scale(producer, [consumer], torch.rand(consumer.in_features) + 0.5, offset=0.0)
    torch.testing.assert_close(consumer(producer(x)), ref, rtol=1e-5, atol=1e-5)


def test_fold_keeps_the_float_function():
    torch.manual_seed(0)
    norm = nn.LayerNorm(16)
    norm.weight.data = torch.rand(16) + 0.5
    lin = nn.Linear(16, 8, bias=False)
    _assert_fold_keeps_function(norm, lin, torch.randn(5, 16))


def test_fold_into_a_producing_linear():
    torch.manual_seed(0)
    up, down = nn.Linear(8, 12), nn.Linear(12, 8, bias=False)
    _assert_fold_keeps_function(up, down, torch.randn(3, 8))


def test_scale_search_protects_salient_channels():
    """Channels with large activations get scaled up, and the output error drops vs. alpha=0."""
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[:, :4] *= 30  # salient input channels
    w = torch.randn(32, 64)
    H = x.t() @ x / len(x)
    s, alpha = search_scale(x.abs().mean(0), H, [w], RTN(bits=3, group_size=32), grid=20)
    assert alpha > 0 and s[:4].mean() > s[4:].mean()


@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_lowers_output_error_on_heavy_tails(sym):
    """Clamping outlier weights to the searched range beats the min/max grid on the layer output,
    and never widens a group's range."""
    torch.manual_seed(0)
    x = torch.randn(1024, 64)
    w = torch.distributions.StudentT(2.0).sample((32, 64))  # heavy-tailed rows
    base = RTN(bits=3, group_size=32, sym=sym)
    clipped = search_clip(x.t() @ x / len(x), w, base)
    assert clipped.abs().le(w.abs() + 1e-6).all()

    def out_err(weights):
        qw = rtn_quantize(weights, base)
        return float((x @ qw.dequantize().t() - x @ w.t()).pow(2).mean())

    assert out_err(clipped) < 0.97 * out_err(w)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_awq_groups_found_from_table_and_shapes(family, tokenizer):
    model = tiny_model(family, vocab=len(tokenizer))
    block = model.model.layers[0]
    names = [prev for prev, _ in _groups_for(model, block)]
    assert "input_layernorm" in names and "mlp.up_proj" in names
    assert "self_attn.v_proj" not in names  # 2 KV heads of 4: shapes do not line up


@pytest.mark.parametrize("base", [RTN(bits=4, group_size=32), GPTQ(bits=4, group_size=32)])
def test_awq_on_a_tiny_model(base, tokenizer):
    run = quantize_tiny_model(AWQ(base=base), vocab=len(tokenizer))
    assert run.quant_linears() == 14
    # per block: norm -> q/k/v, norm -> gate/up, up -> down; no v -> o under GQA
    assert len(run.report["awq_alpha"]) == 2 * 3
    assert run.cosine() > 0.9


def test_quant_error_is_the_output_error():
    torch.manual_seed(0)
    from tinyllm.quant.awq import quant_error

    x, D = torch.randn(256, 32), torch.randn(8, 32)
    direct = (x @ D.t()).pow(2).sum(dim=1).mean()
    assert quant_error(D, x.t() @ x / len(x)) == pytest.approx(float(direct), rel=1e-4)


def _awq_codes(base: RTN | GPTQ, clip: bool, tokenizer, **awq) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = tiny_model(vocab=len(tokenizer))
    calib = torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(1))
    quantize(model, AWQ(base=base, clip=clip, **awq), calib=calib, batch_size=4)
    return [m.qweight.codes() for m in model.modules() if isinstance(m, QuantLinear)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", [RTN, GPTQ])
def test_clipped_awq_quantizes_on_the_clamped_range(kind, tokenizer):
    """After AWQ's clipping search the base (RTN, or GPTQ with static groups) uses the clamped
    weights' min/max grid: asking the base for its own MSE search changes nothing then, and does
    without AWQ's clipping or with base_search."""
    with_search = _awq_codes(kind(bits=4, group_size=32, mse=True), True, tokenizer)
    plain = _awq_codes(kind(bits=4, group_size=32, mse=False), True, tokenizer)
    assert _same(with_search, plain)
    both = _awq_codes(kind(bits=4, group_size=32, mse=True), True, tokenizer, base_search=True)
    assert not _same(both, plain)
    unclipped = _awq_codes(kind(bits=4, group_size=32, mse=True), False, tokenizer)
    unclipped_plain = _awq_codes(kind(bits=4, group_size=32, mse=False), False, tokenizer)
    assert not _same(unclipped, unclipped_plain)
