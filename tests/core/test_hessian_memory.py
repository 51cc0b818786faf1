"""The [in, in] Hessian helpers that run in place or panel by panel (so a 14336-wide Hessian
needs no 0.8 GB temporaries) give exactly what the plain expressions give."""

from __future__ import annotations

import pytest
import torch

from tinyllm.core.hessian import inverse_cholesky, mirror_upper, permuted


@pytest.mark.parametrize("n", [1, 5, 256, 257, 700])
def test_mirror_upper_and_permuted_equal_the_plain_expressions(n):
    g = torch.Generator().manual_seed(n)
    H = torch.randn(n, n, generator=g)
    upper = H.triu()
    assert torch.equal(mirror_upper(H.clone()), upper + upper.triu(1).t())
    order = torch.randperm(n, generator=g)
    assert torch.equal(permuted(H, order), H[order][:, order])


def test_inverse_cholesky_in_an_order_equals_it_on_the_permuted_matrix():
    """With `order`, the factor is that of H[order][:, order], bit for bit, including the
    retries with more damping (a singular H), and H is left as it was."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 300, generator=g) * torch.rand(300, generator=g)
    order = torch.randperm(300, generator=g)
    for H in (X.t() @ X / 512, torch.ones(300, 300)):  # the second needs more damping
        before = H.clone()
        want = inverse_cholesky(H[order][:, order], 0.01, "layer")
        assert torch.equal(inverse_cholesky(H, 0.01, "layer", order), want)
        assert torch.equal(H, before)
