"""GPTQ with float targets (asymmetric calibration, GPTAQ): the math and the two-stream glue."""

import pytest
import torch

from tests.conftest import tiny_model
from tests.quant.tiny import quantize_tiny_model
from tinyllm.core.calib import block_inputs, observe_pair
from tinyllm.quant.awq import AWQ
from tinyllm.quant.gptq import GPTQ, float_target, gptq_quantize


def _streams(seed: int = 0):
    """Float inputs X~ and the quantized model's inputs X = X~ + correlated drift."""
    g = torch.Generator().manual_seed(seed)
    Xf = torch.randn(4096, 64, generator=g) @ torch.randn(64, 64, generator=g)
    X = (
        Xf
        + 0.3 * Xf @ torch.randn(64, 64, generator=g) / 8
        + 0.1 * torch.randn(4096, 64, generator=g)
    )
    W = torch.randn(32, 64, generator=g)
    n = X.shape[0]
    return W, Xf, X, 2 * X.t() @ X / n, 2 * Xf.t() @ X / n


def test_same_streams_give_the_float_weight():
    W, _, _, H, _ = _streams()
    assert torch.allclose(float_target(W, H, H.clone(), 0.01), W)


def test_float_target_is_the_least_squares_answer():
    W, Xf, X, H, C = _streams()
    V = float_target(W, H, C, 0.0)
    ls = torch.linalg.lstsq(X.double(), (Xf @ W.t()).double()).solution.t().float()
    assert torch.allclose(V, ls, atol=1e-3 * W.abs().max())
    half = float_target(W, H, C, 0.0, strength=0.5)  # the strength scales the step
    assert torch.allclose(half, (W + V) / 2, atol=1e-4 * W.abs().max())


def test_gptq_with_float_targets_matches_the_float_outputs_better():
    W, Xf, X, H, C = _streams()
    plain, _ = gptq_quantize(W, H, GPTQ(bits=4, group_size=32))
    aimed, _ = gptq_quantize(W, H, GPTQ(bits=4, group_size=32, float_targets=1.0), C=C)
    target = Xf @ W.t()

    def miss(qw):
        return float((X @ qw.dequantize().t() - target).norm() / target.norm())

    assert miss(aimed) < 0.8 * miss(plain)


def test_a_pruned_layer_keeps_its_zeros():
    W, _, _, H, C = _streams()
    W[:, ::2] = 0
    qw, _ = gptq_quantize(W, H, GPTQ(bits=4, group_size=32, float_targets=1.0), C=C)
    assert torch.equal(qw.dequantize()[:, ::2], torch.zeros(32, 32))


def test_observe_pair_advances_the_reference():
    model = tiny_model()
    ids = torch.randint(0, 320, (2, 24))
    inputs, kwargs = block_inputs(model, [ids])
    block = model.model.layers[0]
    ref = [inputs[0][0].clone()]
    xs = [inputs[0][0] + 0.01 * torch.randn_like(inputs[0][0])]
    seen = []
    observe_pair(block, xs, ref, kwargs[0], ["mlp.down_proj"], lambda n, x, r: seen.append((x, r)))
    assert len(seen) == 1 and seen[0][0].shape == seen[0][1].shape
    assert not torch.equal(seen[0][0], seen[0][1])  # two streams, paired per layer
    assert torch.allclose(ref[0], inputs[1][0], atol=1e-2, rtol=1e-2)  # the float block's output


@pytest.mark.parametrize(
    "cfg",
    [
        GPTQ(bits=3, group_size=32, float_targets=0.25),
        AWQ(base=GPTQ(bits=3, group_size=32, float_targets=0.25)),
    ],
)
def test_float_targets_on_a_tiny_model(cfg):
    run = quantize_tiny_model(cfg)
    assert len(run.report["layer_errors"]) == 14 and run.quant_linears() == 14
    assert run.cosine() > 0.9


def test_stacked_layers_match_separate_ones():
    """q/k/v (or gate/up) quantized as one stack: each keeps its own GPTQ result."""
    from tinyllm.quant.gptq import gptq_quantize_stack

    W, _, _, H, C = _streams()
    parts = [W[:20], W[20:]]
    for c in (None, C):
        cfg = GPTQ(bits=3, group_size=32, float_targets=0.0 if c is None else 0.5)
        stacked = gptq_quantize_stack(parts, H, cfg, C=c)
        for w, (qw, err) in zip(parts, stacked, strict=True):
            alone, err_alone = gptq_quantize(w, H, cfg, C=c)
            assert qw.shape == alone.shape
            same = (qw.codes() == alone.codes()).float().mean()
            assert same > 0.995 and err == pytest.approx(err_alone, rel=0.02)


def test_observe_block_stops_after_the_last_input():
    from tinyllm.core.calib import observe_block

    model = tiny_model()
    inputs, kwargs = block_inputs(model, [torch.randint(0, 320, (2, 16)) for _ in range(3)])
    block = model.model.layers[0]
    names = ["self_attn.q_proj", "mlp.down_proj"]
    seen, mlp_done = [], []  # (the MLP module is never swapped for a fast kernel)
    h = block.mlp.register_forward_hook(lambda *a: mlp_done.append(1))
    try:
        observe_block(block, inputs[0], kwargs[0], names, lambda n, x: seen.append(n))
    finally:
        h.remove()
    assert seen == names * 3  # every batch shows every input
    assert len(mlp_done) == 1  # only the first forward ran past the last observed input
