"""True-sequential GPTQ: a block's layers in stages, each calibrated after its predecessors."""

import collections
import copy
import dataclasses

import pytest
import torch

from tests.conftest import tiny_model
from tests.quant.tiny import quantize_tiny_model
from tinyllm.core import calib
from tinyllm.core.calib import (
    _Kept,
    block_inputs,
    input_stages,
    observe_block,
    observe_pair,
    probe_block,
    replay_plans,
    staged_pass,
)
from tinyllm.core.hessian import HessianAccumulator
from tinyllm.kernels.qlinear import QuantLinear
from tinyllm.models.anatomy import analyze
from tinyllm.quant import gptq as gptq_mod
from tinyllm.quant.api import quantize
from tinyllm.quant.awq import AWQ
from tinyllm.quant.gptq import GPTQ, gptq_block


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_stages_follow_the_forward_and_shared_inputs(family):
    model = tiny_model(family)
    inputs, kwargs = block_inputs(model, [torch.randint(0, 320, (1, 12))])
    block = analyze(model).blocks[0]
    names = [s.local for s in analyze(model).linears if s.block == 0]
    stages = input_stages(block, inputs[0][0], kwargs[0], names)
    assert stages == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def _block_setup(seed=0):
    model = tiny_model(seed=seed)
    inputs, kwargs = block_inputs(model, [torch.randint(0, 320, (2, 24)) for _ in range(2)])
    sites = [s for s in analyze(model).linears if s.block == 0]
    return analyze(model).blocks[0], sites, inputs, kwargs


@torch.no_grad()
def test_later_stages_see_the_quantized_earlier_ones(monkeypatch):
    """o_proj's Hessian comes from a block whose q/k/v are already quantized (and equals the one
    computed by hand from such a block); without stages it comes from the float block."""
    seen = {}
    real = gptq_mod.gptq_quantize_stack

    def spy(Ws, H, cfg, name="layers", C=None):
        seen[name.split(".")[-1]] = H.clone()
        return real(Ws, H, cfg, name, C)

    monkeypatch.setattr(gptq_mod, "gptq_quantize_stack", spy)
    hessians = {}
    for staged in (False, True):
        block, sites, inputs, kwargs = _block_setup()
        qkv = {s.local: s.module.weight.data.clone() for s in sites if "self_attn" in s.local}
        cfg = GPTQ(bits=3, group_size=32, true_sequential=staged)
        records = gptq_block(block, sites, inputs[0], kwargs[0], cfg, {})
        hessians[staged] = seen["o_proj"]
        # by hand: o_proj's inputs with q/k/v quantized (staged) or float (not)
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            block.get_submodule(n).weight.data = records[n].dequantize() if staged else qkv[n]
        acc = HessianAccumulator()
        observe_block(block, inputs[0], kwargs[0], ["self_attn.o_proj"], acc.add)
        assert torch.allclose(
            acc.hessian("self_attn.o_proj"), hessians[staged], rtol=1e-4, atol=1e-5
        )
    assert not torch.allclose(hessians[False], hessians[True], rtol=1e-3, atol=1e-4)


@torch.no_grad()
def test_staged_reference_stream_stays_float():
    """With float targets, ref leaves the block as the *float* block's output although the
    block's weights are quantized stage by stage."""
    block, sites, inputs, kwargs = _block_setup()
    ref = [x.clone() for x in inputs[0]]
    xs = [x + 0.01 * torch.randn_like(x) for x in inputs[0]]
    cfg = GPTQ(bits=3, group_size=32, true_sequential=True, float_targets=0.25)
    gptq_block(block, sites, xs, kwargs[0], cfg, {}, ref=ref)
    for r, want in zip(ref, inputs[1], strict=True):
        assert torch.allclose(r, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_observe_pair_without_advance_leaves_ref():
    block, _sites, inputs, kwargs = _block_setup()
    ref = [x.clone() for x in inputs[0]]
    got = []
    observe_pair(
        block,
        inputs[0],
        ref,
        kwargs[0],
        ["self_attn.o_proj"],
        lambda n, x, r: got.append(n),
        advance=False,
    )
    assert got == ["self_attn.o_proj"] * 2
    assert all(torch.equal(r, x) for r, x in zip(ref, inputs[0], strict=True))


@pytest.mark.parametrize(
    "cfg",
    [
        GPTQ(bits=3, group_size=32, true_sequential=True),
        GPTQ(bits=3, group_size=32, true_sequential=True, float_targets=0.25),
        AWQ(base=GPTQ(bits=3, group_size=32, true_sequential=True, float_targets=0.25)),
        AWQ(base=GPTQ(bits=4, group_size=32, sym=True, true_sequential=True), clip=False),
        GPTQ(bits=3, group_size=32, weighted_grid=True),
        GPTQ(bits=3, group_size=32, weighted_grid=True, static_groups=False),
    ],
)
def test_true_sequential_on_a_tiny_model(cfg):
    run = quantize_tiny_model(cfg)
    assert len(run.report["layer_errors"]) == 14 and run.quant_linears() == 14
    assert run.cosine() > 0.9


def test_shared_inputs_are_recognised_without_address_reuse():
    """Layers reading the same tensor share one Hessian; a tensor freed in between cannot hand
    its memory (and so its address) to the next layer's input, because the accumulator holds
    the last input it compares against."""
    import gc
    import weakref

    acc = HessianAccumulator()
    x = torch.randn(64, 8)
    alive = weakref.ref(x)
    acc.add("q", x)
    acc.add("k", x)  # same tensor: shares q's Hessian
    del x
    gc.collect()
    assert alive() is not None  # still held: its address cannot be reused
    acc.add("o", torch.randn(64, 8))
    assert acc.alias == {"k": "q"} and set(acc.H) == {"q", "o"}


def test_replay_plans_find_modules_that_return_a_linears_output():
    model = tiny_model()
    inputs, kwargs = block_inputs(model, [torch.randint(0, 320, (1, 12))])
    block = analyze(model).blocks[0]
    names = [s.local for s in analyze(model).linears if s.block == 0]
    plans = replay_plans(block, inputs[0][0], kwargs[0], names)
    # attention returns (o_proj's output, None): attention weights are not asked for
    assert plans == {"self_attn.o_proj": ("self_attn", 0, 2), "mlp.down_proj": ("mlp", None, 1)}

    class Scaled(torch.nn.Module):  # its output is computed *from* its linear's output
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return 2 * self.lin(x)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Scaled(), torch.nn.Sequential(torch.nn.Linear(4, 4))

        def forward(self, x):
            return self.b(self.a(x))

    plans = replay_plans(Block(), torch.randn(1, 3, 4), {}, ["a.lin", "b.0"])
    assert plans == {"b.0": ("b", None, 1)}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@torch.no_grad()
def test_staged_pass_equals_stage_by_stage_forwards_with_attention_run_once(family):
    """staged_pass (advance=True) quantizes every layer exactly as the stage-by-stage forwards
    do and leaves the quantized block's outputs in xs, while the attention module runs for
    each batch only in the q/k/v and o stages (then o_proj on kept inputs stands in for it)."""
    model = tiny_model(family)
    batches = [torch.randint(0, 320, (2, 24)) for _ in range(3)]
    inputs, kwargs = block_inputs(model, batches)
    base = analyze(model).blocks[0]
    sites = [s for s in analyze(model).linears if s.block == 0]
    cfg = GPTQ(bits=3, group_size=32, true_sequential=True)
    results = {}
    for advance in (False, True):
        block = copy.deepcopy(base)
        mine = [dataclasses.replace(s, module=block.get_submodule(s.local)) for s in sites]
        calls = collections.Counter()
        for name in ("self_attn", "mlp.gate_proj"):
            block.get_submodule(name).register_forward_pre_hook(
                lambda *_a, name=name, calls=calls: calls.update([name])
            )
        xs = [x.clone() for x in inputs[0]]
        records = gptq_block(block, mine, xs, kwargs[0], cfg, {}, advance=advance)
        results[advance] = records, xs, block, calls
    (r0, _, block0, _), (r1, xs1, _, calls) = results[False], results[True]
    assert r0.keys() == r1.keys() and len(r1) == 7
    for name in r0:
        assert torch.equal(r0[name].dequantize(), r1[name].dequantize()), name
    for x, xq in zip(inputs[0], xs1, strict=True):
        want = block0(x, **kwargs[0])
        want = want[0] if isinstance(want, tuple) else want
        # the final forward applies down_proj to its inputs kept in float16 (11 bits)
        assert torch.allclose(xq, want, atol=1e-3 * want.abs().max().item(), rtol=1e-3)
    n = len(batches)
    # one one-sample trial forward (probe_block) + the q/k/v and o stages
    assert calls["self_attn"] == 1 + 2 * n
    # trial + the gate/up stage (stops at gate_proj's input) + the down stage; the final
    # forward applies down_proj to the inputs kept from its stage instead of the MLP
    assert calls["mlp.gate_proj"] == 1 + 2 * n


def _rounding_pass(block, xs, kwargs, wide, seen, skip=True):
    """staged_pass with a stand-in compression (weights rounded to multiples of 1/512), recording
    the sum of every observed input."""
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    stages = input_stages(block, xs[0][:1], kwargs, names)

    def compress(stage):
        for n in stage:
            w = block.get_submodule(n).weight
            w.data = torch.round(w * 512) / 512

    observe = lambda n, x: seen.append((n, x.double().sum().item()))  # noqa: E731
    staged_pass(block, xs, kwargs, stages, observe, compress, wide=wide, skip=skip)


# Norms whose output only the attention or the MLP reads, per family (Gemma 3's post-attention
# and post-feedforward norms feed the residual sums, in the block's own code)
FED = {
    "llama": {"input_layernorm": "self_attn", "post_attention_layernorm": "mlp"},
    "gemma3": {"input_layernorm": "self_attn", "pre_feedforward_layernorm": "mlp"},
}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@torch.no_grad()
def test_norms_that_only_feed_a_replayed_module_are_not_run(family):
    """probe_block finds the norms whose output only attention or the MLP reads; once those are
    replayed the staged pass skips them, changing nothing it observes or outputs (bit for bit)
    while the input norm runs only in the q/k/v and o stages."""
    model = tiny_model(family)
    batches = [torch.randint(0, 320, (2, 24)) for _ in range(3)]
    inputs, kwargs = block_inputs(model, batches)
    base = analyze(model).blocks[0]
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    feeds = probe_block(base, inputs[0][0][:1], kwargs[0], names).feeds
    # (Gemma 3's MLP also feeds only its post-feedforward norm: true, and never replayed)
    assert {c: r for c, r in feeds.items() if r in ("self_attn", "mlp")} == FED[family]
    outs, seen, calls = {}, {}, {}
    for skip in (False, True):
        block = copy.deepcopy(base)
        calls[skip] = collections.Counter()
        for name in FED[family]:
            block.get_submodule(name).register_forward_pre_hook(
                lambda *_a, name=name, c=calls[skip]: c.update([name])
            )
        xs, seen[skip] = [x.clone() for x in inputs[0]], []
        _rounding_pass(block, xs, kwargs[0], torch.float16, seen[skip], skip=skip)
        outs[skip] = xs
    assert seen[True] == seen[False]
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False], strict=True))
    n, first, second = len(batches), *FED[family]
    # two trial forwards (input_stages, then the staged pass's probe) + the stages that run it:
    # q/k/v, o (then attention is replayed); gate/up, down (then the MLP is)
    assert calls[True] == {first: 2 + 2 * n, second: 2 + 2 * n}
    assert calls[False] == {first: 2 + 5 * n, second: 2 + 3 * n}


@torch.no_grad()
def test_a_norm_the_block_itself_also_reads_is_not_skipped():
    """A block whose residual is the normed input (as with post-layernorm residuals): the norm
    feeds the block's own code too, so it is not skipped, and the outputs equal the unskipped."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)
            self.attn = torch.nn.Sequential(torch.nn.Linear(8, 8))

        def forward(self, x):
            h = self.norm(x)
            return h + self.attn(h)

    block = Block()
    xs = [torch.randn(2, 5, 8) for _ in range(2)]
    assert probe_block(block, xs[0][:1], {}, ["attn.0"]).feeds == {}
    outs = {}
    for skip in (False, True):
        b, ys = copy.deepcopy(block), [x.clone() for x in xs]
        _rounding_pass(b, ys, {}, None, [], skip=skip)
        outs[skip] = ys
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False], strict=True))


@torch.no_grad()
def test_staged_pass_keeps_wide_inputs_in_float16_unless_they_do_not_fit():
    """Kept down_proj inputs: float16 gives the outputs of wide=None (which recomputes them
    exactly) to float16's rounding and changes nothing the stages observe; a batch float16
    cannot hold (values past 65504) is kept in float32, not as inf, so its outputs are exact."""
    kept = _Kept(4, torch.float16)
    big = torch.tensor([1.0, 1e5])
    for x in (torch.tensor([1.0, 3e4]), big, torch.ones(3)):  # the last: another shape
        kept.add(x)
    kept.add(torch.ones(2, dtype=torch.bfloat16))  # no narrower than float16: kept as it is
    stored = [(t.dtype, d) for t, d in kept.items]
    f16, f32, bf16 = torch.float16, torch.float32, torch.bfloat16
    assert stored == [(f16, f32), (f32, f32), (f16, f32), (bf16, bf16)]
    assert kept.items[1][0] is big and kept.items[0][0].data_ptr() == kept.buffer.data_ptr()
    model = tiny_model()
    inputs, kwargs = block_inputs(model, [torch.randint(0, 320, (2, 24)) for _ in range(2)])
    base = analyze(model).blocks[0]
    for gain in (1.0, 1e6):  # 1e6: the MLP's intermediate values overflow float16
        outs, seen = {}, {}
        for wide in (None, torch.float16):
            block = copy.deepcopy(base)
            block.mlp.up_proj.weight.mul_(gain)
            xs = [x.clone() for x in inputs[0]]
            seen[wide] = []
            _rounding_pass(block, xs, kwargs[0], wide, seen[wide])
            outs[wide] = xs
        assert seen[None] == seen[torch.float16]  # every stage observed the same inputs
        for exact, compact in zip(outs[None], outs[torch.float16], strict=True):
            assert torch.isfinite(compact).all()
            if gain == 1.0:
                scale = exact.abs().max().item()
                assert not torch.equal(exact, compact)  # rounded, so not bit for bit
                assert torch.allclose(compact, exact, atol=1e-3 * scale, rtol=1e-3)
            else:
                assert torch.equal(compact, exact)


@pytest.mark.parametrize(
    "cfg",
    [GPTQ(bits=4, group_size=32), AWQ(base=GPTQ(bits=4, group_size=32, true_sequential=True))],
)
def test_staged_gptq_with_materialized_sliding_window_masks(cfg):
    """Windows longer than Gemma 3's sliding window (32 here) give its blocks materialized masks.
    Captured for a whole batch they have the batch's size, which a one-sample trial forward
    cannot take (session 19's code failed so on Gemma-3-270M at 512 tokens); captured on one
    sequence they broadcast to both."""
    model = tiny_model("gemma3")
    report = quantize(model, cfg, calib=torch.randint(0, 320, (8, 48)), batch_size=4)
    assert len(report["layer_errors"]) == 14
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14


@torch.no_grad()
def test_staged_gptq_takes_kwargs_captured_for_a_whole_batch():
    """Keyword arguments that differ between sequences (padding masks) are captured for a whole
    batch (core.calib._block_kwargs falls back). Trial forwards (GPTQ's stages, AWQ's groups)
    then run on the whole first batch: a one-sample forward cannot take Gemma 3's materialized
    masks made for 4 sequences. Stages, groups, quantized weights and outputs are those of the
    one-sequence kwargs."""
    from tinyllm.core.calib import _capture_kwargs, probe_input
    from tinyllm.quant.awq import checked_groups

    model = tiny_model("gemma3")
    batch = torch.randint(0, 320, (4, 48))  # longer than the sliding window (32): masks
    inputs, kwargs = block_inputs(model, [batch])
    blocks = analyze(model).blocks
    whole = _capture_kwargs(model, blocks, batch)[0]
    assert any(
        isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] == 4 for v in whole.values()
    )
    assert probe_input(inputs[0][0], whole).shape[0] == 4
    assert probe_input(inputs[0][0], kwargs[0]).shape[0] == 1
    groups = checked_groups(model, blocks[0], inputs[0][0], kwargs[0], 0)
    assert len(groups) == 3 and checked_groups(model, blocks[0], inputs[0][0], whole, 0) == groups
    sites = [s for s in analyze(model).linears if s.block == 0]
    cfg = GPTQ(bits=4, group_size=32, true_sequential=True)
    results = []
    for kw in (kwargs[0], whole):
        block = copy.deepcopy(blocks[0])
        mine = [dataclasses.replace(s, module=block.get_submodule(s.local)) for s in sites]
        xs = [x.clone() for x in inputs[0]]
        results.append((gptq_block(block, mine, xs, kw, cfg, {}, advance=True), xs))
    (r_one, xs_one), (r_whole, xs_whole) = results
    assert r_one.keys() == r_whole.keys() and len(r_one) == 7
    for name in r_one:
        assert torch.equal(r_one[name].dequantize(), r_whole[name].dequantize()), name
    for a, b in zip(xs_one, xs_whole, strict=True):
        torch.testing.assert_close(a, b)


@torch.no_grad()
def test_staged_pass_recomputes_a_stage_whose_inputs_exceed_the_keep_limit(monkeypatch):
    """Above KEEP_STAGE_BYTES a stage's inputs are not kept: the final forward recomputes the
    module, so the outputs are those of the pass that keeps nothing (wide=None), bit for bit,
    every stage observes the same inputs, and the narrow stage (o_proj's, kept in float32
    below the limit) is recomputed too."""
    model = tiny_model()
    inputs, kwargs = block_inputs(model, [torch.randint(0, 320, (2, 24)) for _ in range(2)])
    base = analyze(model).blocks[0]
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    stages = input_stages(base, inputs[0][0][:1], kwargs[0], names)
    plans = replay_plans(base, inputs[0][0][:1], kwargs[0], names)
    assert len(calib._kept_stages(base, names, stages, plans, inputs[0], torch.float16)) == 2
    outs, seen = {}, {}
    for limit in (0, 1 << 30):
        monkeypatch.setattr(calib, "KEEP_STAGE_BYTES", limit)
        kept = calib._kept_stages(base, names, stages, plans, inputs[0], torch.float16)
        assert len(kept) == (0 if limit == 0 else 2)
        xs, seen[limit] = [x.clone() for x in inputs[0]], []
        _rounding_pass(copy.deepcopy(base), xs, kwargs[0], torch.float16, seen[limit])
        outs[limit] = xs
    monkeypatch.setattr(calib, "KEEP_STAGE_BYTES", 1 << 30)
    xs, none = [x.clone() for x in inputs[0]], []
    _rounding_pass(copy.deepcopy(base), xs, kwargs[0], None, none)
    assert seen[0] == seen[1 << 30] == none
    assert all(torch.equal(a, b) for a, b in zip(outs[0], xs, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(outs[0], outs[1 << 30], strict=True))
