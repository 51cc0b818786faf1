import itertools

import pytest
import torch

from tinyllm.kernels import primitives as P
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.quant.nf4 import NF4, nf4_codebook, nf4_quantize
from tinyllm.quant.rtn import RTN, rtn_quantize


@pytest.mark.parametrize("bits", P.SUPPORTED_BITS)
def test_pack_round_trip(bits):
    q = torch.randint(0, 1 << bits, (7, 13), dtype=torch.uint8)
    packed = P.pack_bits(q, bits)
    assert packed.numel() == (q.numel() * bits + 7) // 8  # dense: size reflects the bits
    assert torch.equal(P.unpack_bits(packed, bits, q.numel()).reshape(q.shape), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [-1, 32])
def test_rtn_error_bound(bits, sym, group):
    """Every weight is within one step of its value (the signed grid has one level fewer on the
    side opposite its extreme, and an asymmetric zero point rounds), and rounding error is
    uniform on average: the mean is near a quarter step."""
    torch.manual_seed(bits * 100 + group)
    w = torch.randn(6, 64)
    qw = rtn_quantize(w, RTN(bits=bits, group_size=group, sym=sym))
    scale = qw.scale.float().abs().repeat_interleave(qw.effective_group, dim=1)
    err = (qw.dequantize() - w).abs()
    assert (err <= scale * 1.01).all()  # 1%: the stored float16 scale is rounded
    assert float(err.mean()) < 0.32 * float(scale.mean())


def test_more_bits_less_error():
    w = torch.randn(32, 128)
    errs = [
        (rtn_quantize(w, RTN(bits=b, group_size=32)).dequantize() - w).norm()
        for b in (2, 3, 4, 5, 8)
    ]
    assert all(a > b for a, b in itertools.pairwise(errs))


def test_symmetric_uses_the_q4_0_grid():
    w = torch.tensor([[-8.0, 7.0, 1.0, 0.0] * 8])
    qw = rtn_quantize(w, RTN(bits=4, group_size=32, sym=True))
    assert float(qw.scale[0, 0]) == 1.0 and int(qw.zero[0, 0]) == 8  # -8 -> code 0
    flipped = rtn_quantize(-w, RTN(bits=4, group_size=32, sym=True))
    assert float(flipped.scale[0, 0]) == -1.0  # +8 is the extreme: negative scale, no clipping
    assert torch.equal(flipped.dequantize(), -w)
    assert torch.equal(qw.dequantize(), w)


def test_mse_clipping_never_worse():
    w = torch.randn(16, 64)
    w[0, 0] = 12.0  # an outlier stretches the min/max grid
    plain = rtn_quantize(w, RTN(bits=3, group_size=32))
    mse = rtn_quantize(w, RTN(bits=3, group_size=32, mse=True))
    assert (mse.dequantize() - w).pow(2).sum() < (plain.dequantize() - w).pow(2).sum()


def test_storage_bits_counts_scales_and_zeros():
    qw = rtn_quantize(torch.randn(8, 64), RTN(bits=4, group_size=32, sym=False))
    assert qw.storage_bits() == 8 * 64 * 4 + 8 * 2 * 16 + 8 * 2 * 4


def test_record_tensors_round_trip():
    qw = rtn_quantize(torch.randn(8, 64), RTN(bits=3, group_size=32))
    back = QuantizedWeight.from_tensors(qw.tensors("x"), "x", qw.meta())
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_nf4_codebook():
    book = nf4_codebook()
    assert book.numel() == 16 and book[0] == -1.0 and book[-1] == 1.0
    assert (book == 0).sum() == 1 and (book > 0).sum() == 8
    assert torch.all(book[1:] > book[:-1])
    # QLoRA's published values, to 4 decimals
    assert book[8].item() == pytest.approx(0.0796, abs=1e-4)
    assert book[1].item() == pytest.approx(-0.6962, abs=1e-4)


def test_nf4_picks_nearest_code():
    w = torch.randn(4, 64)
    qw = nf4_quantize(w, NF4(block_size=32))
    book = nf4_codebook()
    normed = w.view(4, 2, 32) / qw.scale.float()[..., None]
    best = (normed[..., None] - book).abs().amin(-1)
    got = (normed - book[qw.codes().view(4, 2, 32).long()]).abs()
    torch.testing.assert_close(got, best)


def test_nf4_double_quant_stores_8_bit_scales_and_round_trips():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    plain = nf4_quantize(w, NF4(block_size=64, double_quant=False))
    dq = nf4_quantize(w, NF4(block_size=64, double_quant=True))
    n_scales = 64 * 2
    assert plain.storage_bits() - dq.storage_bits() == n_scales * 16 - (n_scales * 8 + 32 + 32)
    assert dq.scale_dq["codes"].dtype == torch.int8
    # the second quantization costs little: weight error within 2% of plain NF4's
    e_plain = (plain.dequantize() - w).norm()
    assert (dq.dequantize() - w).norm() < 1.02 * e_plain
    back = QuantizedWeight.from_tensors(dq.tensors("x"), "x", dq.meta())
    assert "x.scale" not in dq.tensors("x")  # only the 8-bit form is stored
    assert torch.equal(back.dequantize(), dq.dequantize())


def test_weighted_clipping_search_minimises_the_weighted_error():
    """With column importances the search picks, per group, the candidate with the lowest
    importance-weighted squared error; unit importances give the plain squared-error search."""
    from tinyllm.kernels.primitives import fake_quant, group_qparams, grouped

    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.linspace(0.2, 3.0, 64)
    imp = torch.rand(64) ** 4 * 100

    def weighted_err(s, z):
        g = grouped(w, 32)
        return (
            (fake_quant(g, s[..., None], z[..., None], 3) - g) ** 2 * grouped(imp[None], 32)
        ).sum(-1)

    plain = group_qparams(w, 3, 32, False, mse=True, norm=2.0)
    weighted = group_qparams(w, 3, 32, False, mse=True, norm=2.0, importance=imp)
    assert (weighted_err(*weighted) <= weighted_err(*plain) + 1e-6).all()
    assert weighted_err(*weighted).sum() < 0.98 * weighted_err(*plain).sum()
    ones = group_qparams(w, 3, 32, False, mse=True, norm=2.0, importance=torch.ones(64))
    assert torch.equal(ones[0], plain[0]) and torch.equal(ones[1], plain[1])


@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (3, 32, False), (4, 32, True)])
@pytest.mark.parametrize("norm,weighted", [(2.0, True), (2.4, False)])
def test_clipping_search_picks_the_best_candidate_of_the_grid(bits, group, sym, norm, weighted):
    """The in-place search returns, for every group, exactly the candidate of SHRINK_GRID (the
    first among equals) whose weighted |w - fake_quant(w)|^norm is smallest, as a plain
    out-of-place evaluation of every candidate finds it."""
    from tinyllm.kernels.primitives import SHRINK_GRID, _affine_params, fake_quant, grouped

    torch.manual_seed(1)
    w = torch.randn(40, 128) * torch.linspace(0.1, 4.0, 128)
    imp = torch.rand(128) ** 3 if weighted else None
    g = grouped(w, group)
    lo, hi = g.amin(-1), g.amax(-1)
    weight = grouped(imp[None], group) if weighted else 1.0
    errs, cands = [], []
    for shrink in SHRINK_GRID.tolist():
        s, z = _affine_params(lo * shrink, hi * shrink, bits, sym)
        errs.append(
            ((fake_quant(g, s[..., None], z[..., None], bits) - g).abs() ** norm * weight).sum(-1)
        )
        cands.append((s, z))
    pick = torch.stack(errs).argmin(0)  # first minimum
    want_s = torch.stack([c[0] for c in cands]).gather(0, pick[None])[0]
    want_z = torch.stack([c[1] for c in cands]).gather(0, pick[None])[0]
    s, z = P.group_qparams(w, bits, group, sym, mse=True, norm=norm, importance=imp)
    assert torch.equal(s, want_s) and torch.equal(z, want_z)
