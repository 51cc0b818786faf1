"""Masks from scores, the OWL allocation, and the pure pruning math on single layers."""

from __future__ import annotations

import pytest
import torch

from tinyllm.core.hessian import output_error
from tinyllm.errors import ConfigError
from tinyllm.prune.common import layer_mask, nm_mask, parse_pattern, row_mask
from tinyllm.prune.magnitude import Magnitude
from tinyllm.prune.owl import allocate, outlier_ratio, wanda_score
from tinyllm.prune.sparsegpt import SparseGPT, sparsegpt_prune
from tinyllm.prune.wanda import Wanda


def test_row_and_layer_masks_remove_the_lowest_scores() -> None:
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 8.0, 7.0, 6.0]])
    assert row_mask(score, 0.5).tolist() == [[True, False, True, False], [False, True, True, False]]
    assert layer_mask(score, 0.5).tolist() == [
        [True, False, False, False],
        [False, True, True, True],
    ]


def test_nm_mask_keeps_n_of_every_m() -> None:
    score = torch.rand(6, 16)
    mask = nm_mask(score, 2, 4)
    assert (mask.reshape(6, 4, 4).sum(-1) == 2).all()
    kept_min = torch.where(mask, score, torch.inf).reshape(6, 4, 4).amin(-1)
    dropped_max = torch.where(~mask, score, -torch.inf).reshape(6, 4, 4).amax(-1)
    assert (kept_min >= dropped_max).all()
    with pytest.raises(ConfigError, match="divisible by 3"):
        nm_mask(score, 1, 3)


def test_patterns_and_sparsity_are_validated() -> None:
    assert parse_pattern("4:8") == (4, 8)
    for bad in ("2-4", "4:2", "0:4"):
        with pytest.raises(ValueError):
            Wanda(pattern=bad)
    for s in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            Magnitude(sparsity=s)
    with pytest.raises(ValueError, match="owl"):
        Wanda(pattern="2:4", allocation="owl")


def test_wanda_keeps_small_weights_on_loud_inputs() -> None:
    w = torch.tensor([[1.0, 0.1, 0.9, 0.2]])
    norms = torch.tensor([1.0, 100.0, 1.0, 1.0])
    keep = row_mask(wanda_score(w, norms), 0.5)
    assert keep.tolist() == [[True, True, False, False]]  # magnitude would keep 1.0 and 0.9


def test_owl_allocation_mean_range_and_order() -> None:
    out = allocate([0.01, 0.05, 0.02, 0.09], target=0.5, lam=0.08)
    assert sum(out) / 4 == pytest.approx(0.5)
    assert max(out) - min(out) == pytest.approx(0.16)
    assert out[3] == min(out) and out[0] == max(out)  # most outliers -> least sparsity
    assert allocate([0.3, 0.3], 0.5, 0.08) == pytest.approx([0.5, 0.5])
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 100.0])], 2.0) == 0.25


def _layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 128, generator=g)
    mix = torch.randn(128, 128, generator=g) * 0.3 + torch.eye(128)
    x = torch.randn(1024, 128, generator=g) @ mix * torch.linspace(0.2, 3.0, 128)
    return w, 2 * x.t() @ x / x.shape[0], x


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_beats_wanda_and_magnitude_on_output_error(pattern) -> None:
    w, H, x = _layer()
    w_sgpt, rec, err = sparsegpt_prune(w, H, SparseGPT(sparsity=0.5, pattern=pattern), 0.5)
    assert rec is None and err == pytest.approx(output_error(w, w_sgpt, H))
    assert float((w_sgpt == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    if pattern:
        assert ((w_sgpt != 0).reshape(48, -1, 4).sum(-1) <= 2).all()
    norms = x.pow(2).sum(0).sqrt()
    cfg = Wanda(sparsity=0.5, pattern=pattern)
    wanda = w * (
        nm_mask(wanda_score(w, norms), 2, 4) if pattern else row_mask(wanda_score(w, norms), 0.5)
    )
    magnitude = w * (nm_mask(w.abs(), 2, 4) if pattern else row_mask(w.abs(), 0.5))
    assert cfg.target == 0.5
    assert err < output_error(w, wanda, H) < output_error(w, magnitude, H)


def test_sparsegpt_fused_quantization_keeps_zeros_exact() -> None:
    w, H, _ = _layer(1)
    cfg = SparseGPT(sparsity=0.5, bits=4, group_size=32, sym=False)
    w_q, rec, err = sparsegpt_prune(w, H, cfg, 0.5)
    assert rec is not None and rec.bits == 4
    torch.testing.assert_close(rec.dequantize(), w_q)
    assert float((w_q == 0).float().mean()) >= 0.5
    _, _, err_plain = sparsegpt_prune(w, H, SparseGPT(sparsity=0.5), 0.5)
    assert err_plain < err < 2 * err_plain + 0.05
