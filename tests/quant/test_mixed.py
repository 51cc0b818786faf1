"""Mixed precision: the allocator on known tables, measured sensitivities, budgets, per-layer widths
through RTN/GPTQ/AWQ, checkpoints and errors, on tiny random models."""

import itertools
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import tinyllm
from tests.conftest import tiny_model
from tinyllm.checkpoint import save_checkpoint
from tinyllm.core.steps import Context
from tinyllm.errors import ConfigError
from tinyllm.eval.divergence import token_kl
from tinyllm.kernels.qlinear import QuantLinear
from tinyllm.models.anatomy import analyze
from tinyllm.quant.api import quantize
from tinyllm.quant.awq import AWQ
from tinyllm.quant.common import layer_cfg, target_linears
from tinyllm.quant.gptq import GPTQ
from tinyllm.quant.mixed import (
    Mixed,
    SensitivityProbe,
    allocate,
    kl_from_delta,
    measure_sensitivity,
    storage_bits,
)
from tinyllm.quant.rtn import RTN, rtn_quantize

GRID = RTN(bits=4, group_size=32)


def _brute_force(loss: torch.Tensor, cost: torch.Tensor, budget: int) -> float:
    best = float("inf")
    for picks in itertools.product(range(loss.shape[1]), repeat=loss.shape[0]):
        idx = torch.tensor(picks)[:, None]
        if int(cost.gather(1, idx).sum()) <= budget:
            best = min(best, float(loss.gather(1, idx).sum()))
    return best


def _picked(table: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    return table.gather(1, picks[:, None]).squeeze(1)


def test_allocate_known_table():
    """Greedy by loss drop per bit would upgrade layer 0 first (0.9 per bit) and then have no room
    left for layer 1's large drop; the optimum spends the 5 extra bits on layer 1 alone."""
    loss = torch.tensor([[1.0, 0.1, 0.0], [10.0, 9.5, 5.6], [1.0, 1.0, 1.0]])
    cost = torch.tensor([[3, 4, 8], [3, 4, 8], [3, 4, 8]])
    picks = allocate(loss, cost, budget=9 + 5)
    assert picks.tolist() == [0, 2, 0]  # loss 1 + 5.6 + 1 = 7.6 beats 0.1 + 9.5 + 1 = 10.6
    assert int(_picked(cost, picks).sum()) == 14


@pytest.mark.parametrize("seed", range(6))
def test_allocate_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    layers, sizes = 7, torch.tensor([3, 1, 1, 3, 8, 8, 8])
    widths = torch.tensor([2, 3, 4, 8])
    cost = sizes[:, None] * widths[None, :]
    loss = torch.rand(layers, 4, generator=g).sort(dim=1, descending=True).values
    budget = int(sizes.sum() * (2 + 4 * torch.rand(1, generator=g).item()))
    picks = allocate(loss, cost, budget)
    assert int(_picked(cost, picks).sum()) <= budget
    assert float(_picked(loss, picks).sum()) == pytest.approx(_brute_force(loss, cost, budget))


def test_allocate_coarse_units_keep_the_budget():
    """Costs without a common divisor and a table coarsened to few states: the budget holds and
    the result stays close to the optimum."""
    g = torch.Generator().manual_seed(0)
    cost = torch.randint(1000, 5000, (6, 1), generator=g) * torch.tensor([[3, 4, 8]])
    cost = cost + torch.randint(0, 7, cost.shape, generator=g)
    loss = torch.rand(6, 3, generator=g).sort(dim=1, descending=True).values
    budget = int(cost[:, 1].sum())
    picks = allocate(loss, cost, budget, max_states=200)
    assert int(_picked(cost, picks).sum()) <= budget
    assert float(_picked(loss, picks).sum()) <= _brute_force(loss, cost, budget) + 0.2


def test_allocate_ample_budget_takes_the_widest():
    loss = torch.tensor([[1.0, 0.5, 0.5], [2.0, 1.0, 0.0]])
    cost = torch.tensor([[3, 4, 8], [3, 4, 8]])
    assert allocate(loss, cost, budget=100).tolist() == [2, 2]


def test_kl_from_delta_is_the_kl():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 5, 50, generator=g) * 3
    d = torch.randn(2, 5, 50, generator=g) * 0.5
    want = float(token_kl(ref, ref + d).double().sum())
    assert kl_from_delta(torch.softmax(ref, -1), d) == pytest.approx(want, rel=1e-4)
    huge = torch.zeros(1, 50)
    huge[0, 3] = 200.0  # exp overflows float32: the log-sum-exp fallback
    want = float(token_kl(ref[0, :1], ref[0, :1] + huge).sum())
    assert kl_from_delta(torch.softmax(ref[0, :1], -1), huge) == pytest.approx(want, rel=1e-4)


def _opinionated(family: str):
    """A tiny model with large weights: peaked predictions, KL well above float32 rounding."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    cfg = tiny_config(family)
    cfg.initializer_range = 0.2
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3", "full-forward"])
def test_sensitivity_is_the_measured_kl(family, monkeypatch):
    """The cached run-from-the-block measurement equals a full forward with the layer quantized;
    so does the fallback for models whose ops after the last block are not found."""
    if family == "full-forward":
        import tinyllm.quant.mixed as mixed

        monkeypatch.setattr(mixed, "_tail_modules", lambda *a: None)
        family = "llama"
    model = _opinionated(family)
    windows = torch.randint(0, 320, (4, 16))
    sites = target_linears(model)
    picked = [sites[1], sites[-1]]

    def quantizer(w, bits):
        return rtn_quantize(w, RTN(bits=bits, group_size=-1)).dequantize()

    sens = measure_sensitivity(model, picked, windows, [2, 8], quantizer)
    with torch.no_grad():
        ref = model(windows).logits
        for s in picked:
            w = s.module.weight.data
            s.module.weight.data = quantizer(w, 2)
            want = float(token_kl(ref, model(windows).logits).mean())
            s.module.weight.data = w
            assert sens[s.name][2] == pytest.approx(want, rel=1e-3, abs=1e-9)
            assert 0 <= sens[s.name][8] < sens[s.name][2]
        assert torch.equal(model(windows).logits, ref)  # weights restored


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_block_sensitivity_is_the_block_output_error(family):
    """Block-local sensitivity: the mean squared change of the layer's own block output on the
    float inputs of that block, for every layer and option, weights restored."""
    from tinyllm.core.calib import block_inputs, run_block
    from tinyllm.quant.mixed import block_sensitivity

    model = _opinionated(family)
    windows = torch.randint(0, 320, (4, 16))
    sites = target_linears(model)

    def quantizer(w, bits):
        return rtn_quantize(w, RTN(bits=bits, group_size=-1)).dequantize()

    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = block_sensitivity(model, windows, [2, 8], quantizer, Context(batch_size=2))
    assert set(sens) == {s.name for s in sites}
    inputs, kwargs = block_inputs(model, list(windows.split(2)))
    blocks = analyze(model).blocks
    with torch.no_grad():
        for s in (sites[1], sites[-1]):
            xs, kw, block = inputs[s.block], kwargs[s.block], blocks[s.block]
            ref = [run_block(block, x, kw) for x in xs]
            w = s.module.weight.data
            s.module.weight.data = quantizer(w, 2)
            err = sum(
                float((run_block(block, x, kw) - r).pow(2).sum())
                for x, r in zip(xs, ref, strict=True)
            )
            s.module.weight.data = w
            assert sens[s.name][2] == pytest.approx(err / windows.numel(), rel=1e-4)
            assert 0 <= sens[s.name][8] < sens[s.name][2]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_probe_finds_the_final_norm():
    model = tiny_model("llama")
    probe = SensitivityProbe(model, torch.randint(0, 320, (2, 8)))
    assert probe.tail == [model.model.norm]


def test_layer_cfg():
    assert layer_cfg(GRID, "a", {}) is GRID
    assert layer_cfg(GRID, "a", {"a": 4}) is GRID
    assert layer_cfg(GRID, "a", {"a": 8, "b": 2}) == RTN(bits=8, group_size=32)


def _quantized(model) -> dict[str, int]:
    return {n: m.qweight.bits for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _calib(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(1))


def test_budget_is_met_and_allocated_widths_are_used():
    model = tiny_model()
    report = quantize(model, Mixed(base=GRID, avg_bits=3.5), calib=_calib())
    alloc = report["bit_allocation"]
    assert len(alloc) == 14 and set(alloc.values()) <= {3, 4, 8}
    assert len(set(alloc.values())) > 1
    assert 3.4 <= report["avg_bits"] <= 3.5
    assert _quantized(model) == alloc
    assert set(report["sensitivity"]) == {s.name for s in analyze(model).linears}
    assert all(set(v) == {3, 4, 8} for v in report["sensitivity"].values())


def test_size_budget_counts_scales_and_zeros():
    model = tiny_model()
    size_mb = 0.05  # 0.032 MiB at 3 bits, 0.077 at 8
    report = quantize(model, Mixed(base=GRID, size_mb=size_mb), calib=_calib())
    stored = sum(m.qweight.storage_bits() for m in model.modules() if isinstance(m, QuantLinear))
    assert stored <= size_mb * 8 * 2**20
    assert stored >= 0.95 * size_mb * 8 * 2**20
    assert report["budget_used"] == pytest.approx(stored / (8 * 2**20))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [3, 8])
def test_storage_bits_matches_the_record(bits, sym):
    w = torch.randn(24, 64)
    qw = rtn_quantize(w, RTN(bits=bits, group_size=32, sym=sym))
    assert storage_bits(24, 64, bits, 32, sym) == qw.storage_bits()


@pytest.mark.parametrize("width", [3, 8])
def test_single_width_equals_uniform(width):
    """The budget at one width: the same model as uniform quantization at that width."""
    calib, x = _calib(), torch.randint(0, 320, (2, 24))
    ref, model = tiny_model(), tiny_model()
    quantize(ref, RTN(bits=width, group_size=32), calib=calib)
    quantize(model, Mixed(base=GRID, avg_bits=width), calib=calib)
    assert set(_quantized(model).values()) == {width}
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


@pytest.mark.parametrize(
    "base",
    [
        GPTQ(bits=4, group_size=32),
        AWQ(base=RTN(bits=4, group_size=32)),
        AWQ(base=GPTQ(bits=4, group_size=32)),
    ],
)
@pytest.mark.parametrize("width", [3, 8])
def test_single_width_reaches_the_quantizers_as_uniform(base, width, monkeypatch):
    """The budget at one width: every search and every layer's quantization gets the uniform
    config at that width. (Compared by config: GPTQ's and AWQ's float results already differ
    in the last bits from one uniform run to the next, flipping a code or an alpha now and then.)"""
    import tinyllm.quant.awq as awq
    import tinyllm.quant.gptq as gptq

    seen = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.append(next(a for a in args if isinstance(a, RTN | GPTQ)))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module, name in [
        (gptq, "gptq_quantize_stack"),  # GPTQ quantizes q/k/v and gate/up as stacks
        (awq, "gptq_quantize"),
        (awq, "rtn_quantize"),
    ]:
        spy(module, name)
    spy(awq, "search_scale")
    spy(awq, "search_clip")
    model = tiny_model()
    quantize(model, Mixed(base=base, avg_bits=width), calib=_calib(), batch_size=4)
    inner = awq.clamped_base(base.base, base) if isinstance(base, AWQ) else base  # as AWQ runs it
    uniform = inner.model_copy(update={"bits": width})
    assert len(seen) >= 8, [
        (c.bits, type(c).__name__) for c in seen
    ]  # 2 blocks x (4 stacks, or 7 layers)
    assert all(c.model_dump() == uniform.model_dump() for c in seen)
    assert set(_quantized(model).values()) == {width}


def test_single_offered_width_equals_uniform():
    calib, x = _calib(), torch.randint(0, 320, (2, 24))
    ref, model = tiny_model(), tiny_model()
    quantize(ref, RTN(bits=4, group_size=32), calib=calib)
    quantize(model, Mixed(base=GRID, bits=[4], avg_bits=4), calib=calib)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


@pytest.mark.parametrize("base", [GPTQ(bits=4, group_size=32), AWQ(base=GPTQ(group_size=32))])
def test_mixed_widths_through_calibrated_bases(base, monkeypatch):
    """Each layer gets its own width; AWQ searches a group's scale on its narrowest consumer."""
    import tinyllm.quant.awq as awq

    model = tiny_model()
    names = {id(s.module.weight): s.name for s in target_linears(model)}
    searched = []
    real = awq.search_scale

    def spy(x_mag, H, weights, grid, steps):
        searched.append(([names[id(w)] for w in weights], grid.bits))
        return real(x_mag, H, weights, grid, steps)

    monkeypatch.setattr(awq, "search_scale", spy)
    report = quantize(model, Mixed(base=base, avg_bits=3.5), calib=_calib(), batch_size=4)
    alloc = report["bit_allocation"]
    assert _quantized(model) == alloc
    assert len(set(alloc.values())) > 1
    assert len(searched) == (6 if isinstance(base, AWQ) else 0)
    for consumers, bits in searched:
        assert bits == min(alloc[c] for c in consumers)
    if isinstance(base, AWQ):
        assert any(len({alloc[c] for c in consumers}) > 1 for consumers, _ in searched)


def test_override_does_not_leak_into_later_steps():
    ctx = Context(calib=_calib())
    model = tiny_model()
    from tinyllm.core.steps import compress

    compress(model, [Mixed(base=GRID, avg_bits=3.5)], ctx)
    assert ctx.layer_bits == {} and "bit_allocation" in ctx.report


def test_checkpoint_round_trip(tmp_path: Path, tokenizer):
    model = tiny_model(vocab=len(tokenizer))
    cfg = Mixed(base=GRID, avg_bits=3.5)
    quantize(model, cfg, calib=torch.randint(0, len(tokenizer), (8, 32)))
    x = torch.randint(0, len(tokenizer), (2, 24))
    save_checkpoint(model, tokenizer, tmp_path / "q", {"steps": [cfg.describe()]})
    back, _ = tinyllm.load(tmp_path / "q")
    assert _quantized(back) == _quantized(model)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


def test_bad_settings():
    with pytest.raises(ValidationError, match=r"avg_bits 2.5 is below the smallest width .*\(3\)"):
        Mixed(avg_bits=2.5)
    with pytest.raises(ValidationError, match=r"bits must be among .* got \[6\]"):
        Mixed(bits=[4, 6], avg_bits=4)
    with pytest.raises(ValidationError, match="exactly one budget"):
        Mixed(avg_bits=3.5, size_mb=50)
    with pytest.raises(ValidationError, match="exactly one budget"):
        Mixed()
    with pytest.raises(ValidationError, match="at least one width"):
        Mixed(bits=[], avg_bits=4)
    with pytest.raises(ValidationError, match="sensitivity_samples"):
        Mixed(avg_bits=4, sensitivity_samples=0)
    assert Mixed(avg_bits=9).avg_bits == 9  # above the widest: everything gets the widest


def test_size_below_the_narrowest_width():
    with pytest.raises(ConfigError, match=r"size_mb 0.001 is below the smallest size reachable"):
        quantize(tiny_model(), Mixed(base=GRID, size_mb=0.001), calib=_calib())


def test_budget_above_the_widest_width():
    model = tiny_model()
    report = quantize(model, Mixed(base=GRID, avg_bits=12), calib=_calib())
    assert set(report["bit_allocation"].values()) == {8}
