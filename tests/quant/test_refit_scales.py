"""Least-squares refit of GPTQ's group scales with the codes fixed (GPTQ(refit_scales=N))."""

import pytest
import torch

from tinyllm.core.hessian import output_error
from tinyllm.quant.gptq import GPTQ, _gptq, gptq_quantize, refit_scales


def _problem(seed: int = 0, rows: int = 24, cols: int = 128):
    """Correlated inputs with a few loud channels (where a weight-only grid is not optimal)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4096, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5
    X[:, :4] *= 10
    W = torch.randn(rows, cols, generator=g)
    return W, X, 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize(
    "cfg",
    [
        GPTQ(bits=4, group_size=32, sym=True),
        GPTQ(bits=3, group_size=32),
        GPTQ(bits=4, group_size=64, act_order=True, static_groups=False),  # codes permuted
        GPTQ(bits=4, group_size=-1),
    ],
)
def test_refit_is_the_least_squares_scale(cfg):
    """Each row's new scales minimise ||X (w - A s)||^2 over s for its fixed codes: compare with
    torch's least squares on the data itself (not on H)."""
    W, X, H = _problem()
    qw = _gptq(W, H, cfg, "layer")
    new = refit_scales(qw, W, H, ridge=0.0)
    assert torch.equal(new.codes(), qw.codes()) and torch.equal(new.zero, qw.zero)
    g = qw.effective_group
    c = qw.codes().float() - qw.zero.float().repeat_interleave(g, dim=1)
    Xs, Ws = (X[:, qw.perm], W[:, qw.perm]) if qw.perm is not None else (X, W)
    for r in range(W.shape[0]):
        A = torch.zeros(W.shape[1], qw.groups, dtype=torch.float64)
        for k in range(qw.groups):
            A[k * g : (k + 1) * g, k] = c[r, k * g : (k + 1) * g].double()
        XA = Xs.double() @ A
        s = torch.linalg.lstsq(XA, (Xs.double() @ Ws[r].double())[:, None]).solution[:, 0]
        assert torch.allclose(new.scale[r].double(), s, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("sym", [True, False])
def test_refit_never_raises_the_output_error(sym):
    for seed in range(3):
        W, _, H = _problem(seed)
        qw = _gptq(W, H, GPTQ(bits=4, group_size=32, sym=sym), "layer")
        before = output_error(W, qw.dequantize(), H)
        after = output_error(W, refit_scales(qw, W, H).dequantize(), H)
        assert after <= before * (1 + 1e-3)  # fp16 rounding of the stored scales only
        assert after < 0.99 * before  # and on these problems it helps


def test_a_group_at_the_zero_point_keeps_its_scale():
    """A group whose codes all sit at the zero point carries no information about its scale:
    the ridge keeps the old one (the plain normal equations would be singular)."""
    W, _, H = _problem()
    qw = _gptq(W, H, GPTQ(bits=4, group_size=32, sym=True), "layer")
    codes = qw.codes()
    codes[0, :32] = 8  # sym zero point: every weight of row 0, group 0 is exactly zero
    dead = type(qw).from_codes(codes, qw.scale, qw.zero, bits=4, group_size=32, sym=True)
    new = refit_scales(dead, W, H)
    assert new.scale[0, 0] == dead.scale[0, 0]
    assert torch.isfinite(new.scale.float()).all()


def test_rounds_lower_gptq_error():
    """refit_scales=0, 1, 2 on the same layer: each round lowers the output error."""
    W, _, H = _problem(rows=48)
    errs = [gptq_quantize(W, H, GPTQ(bits=3, group_size=32, refit_scales=n))[1] for n in range(3)]
    assert errs[1] < 0.98 * errs[0] and errs[2] <= errs[1] * (1 + 1e-3)


def test_fixed_grid_reproduces_gptq():
    """_gptq with its own grid passed back in gives the same codes (what a refit round reuses)."""
    W, _, H = _problem()
    for cfg in (GPTQ(bits=4, group_size=32), GPTQ(bits=4, group_size=32, static_groups=False)):
        qw = _gptq(W, H, cfg, "layer")
        again = _gptq(W, H, cfg, "layer", grid=(qw.scale, qw.zero))
        assert torch.equal(again.codes(), qw.codes())
        assert torch.equal(again.scale, qw.scale) and torch.equal(again.zero, qw.zero)


def test_chunked_rows_give_the_same_scales(monkeypatch):
    """Wide layers go through the solve in row chunks: same scales as all rows at once."""
    import tinyllm.quant.gptq as gptq

    W, _, H = _problem()
    qw = _gptq(W, H, GPTQ(bits=4, group_size=32), "layer")
    whole = refit_scales(qw, W, H)
    monkeypatch.setattr(gptq, "REFIT_CHUNK_FLOATS", 5 * 4 * 4 * 32)  # 5 rows per chunk
    assert torch.allclose(refit_scales(qw, W, H).scale.float(), whole.scale.float(), rtol=1e-3)
