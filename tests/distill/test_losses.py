"""Each loss against a hand computation on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch

from tinyllm.distill import losses
from tinyllm.distill.cache import log_rest
from tinyllm.distill.student import kept_blocks


def _softmax(xs: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


S, T = [1.0, 2.0, 0.5], [2.0, 0.0, 1.0]


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_forward_kd_by_hand(temp: float) -> None:
    want = _kl(_softmax(T, temp), _softmax(S, temp)) * temp**2
    got = losses.kd_loss(torch.tensor([S]), torch.tensor([T]), temp)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_reverse_and_js_by_hand() -> None:
    p, q = _softmax(T), _softmax(S)
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    rev = losses.kd_loss(torch.tensor([S]), torch.tensor([T]), kind="reverse")
    js = losses.kd_loss(torch.tensor([S]), torch.tensor([T]), kind="js")
    assert float(rev) == pytest.approx(_kl(q, p), rel=1e-5)
    assert float(js) == pytest.approx(0.5 * _kl(p, m) + 0.5 * _kl(q, m), rel=1e-5)


def test_kd_is_mean_over_positions_and_zero_on_equal() -> None:
    s = torch.randn(2, 3, 7)
    assert float(losses.kd_loss(s, s.clone())) == pytest.approx(0.0, abs=1e-6)
    per = [float(losses.kd_loss(s[i, j], s[1 - i, j])) for i in range(2) for j in range(3)]
    assert float(losses.kd_loss(s, s.flip(0))) == pytest.approx(sum(per) / 6, rel=1e-5)


def test_topk_kd_equals_full_kd_when_k_is_vocab() -> None:
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    top = t.topk(11, dim=-1)
    full = losses.kd_loss(s, t, 2.0)
    assert float(losses.kd_loss_topk(s, top.values, top.indices, 2.0)) == pytest.approx(
        float(full), rel=1e-5
    )


def test_topk_kd_renormalises_teacher_over_k() -> None:
    s, t = [0.0, 1.0, 2.0, 3.0], [3.0, 2.0, -9.0, -9.0]
    p = _softmax(t[:2])  # teacher renormalised over its top 2
    log_q = [math.log(v) for v in _softmax(s)]
    want = sum(a * (math.log(a) - log_q[i]) for i, a in enumerate(p))
    top = torch.tensor([t]).topk(2, dim=-1)
    got = losses.kd_loss_topk(torch.tensor([s]), top.values, top.indices)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_topk_kd_with_the_rest_by_hand() -> None:
    """With the teacher's mass outside its top k, the KL runs over k + 1 outcomes."""
    s, t = [0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 0.5, -1.0]
    p, q = _softmax(t), _softmax(s)
    pk, qk = [p[0], p[1], p[2] + p[3]], [q[0], q[1], q[2] + q[3]]
    want = sum(a * math.log(a / b) for a, b in zip(pk, qk, strict=True))
    logits = torch.tensor([t])
    top = logits.topk(2, dim=-1)
    rest = log_rest(logits, top.indices)
    assert float(rest.exp()) == pytest.approx(p[2] + p[3], rel=1e-6)
    got = losses.kd_loss_topk(torch.tensor([s]), top.values, top.indices, rest=rest)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_topk_kd_with_the_rest_keeps_the_tail() -> None:
    """A student equal to the teacher: zero loss and zero gradient with the rest; the
    renormalised loss instead pushes the student's tail mass into the teacher's top k."""
    t = torch.randn(6, 50) * 2
    top = t.topk(8, dim=-1)
    rest = log_rest(t, top.indices)
    grads = []
    for r in (rest, None):
        s = t.clone().requires_grad_(True)
        loss = losses.kd_loss_topk(s, top.values, top.indices, rest=r)
        loss.backward()
        grads.append(s.grad.abs().max())
        if r is not None:
            assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(grads[0]) < 1e-6 < float(grads[1])
    full = t.topk(50, dim=-1)  # k = V: no rest, same as full KD, finite gradients
    s = torch.randn(6, 50, requires_grad=True)
    loss = losses.kd_loss_topk(s, full.values, full.indices, rest=log_rest(t, full.indices))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(losses.kd_loss(s, t).detach()), rel=1e-5)
    assert torch.isfinite(s.grad).all()


def test_feature_losses_by_hand() -> None:
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[0.0, 1.0], [0.0, 2.0]]])
    # mse: ((1)^2 + 1^2 + 0 + 0) / 4 = 0.5, teacher mean square (0 + 1 + 0 + 4) / 4 = 1.25
    assert float(losses.feature_loss(s, t, "mse")) == pytest.approx(0.5 / 1.25)
    # cosine: first pair orthogonal (1 - 0), second identical (1 - 1) -> mean 0.5
    assert float(losses.feature_loss(s, t, "cosine")) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="feature kind"):
        losses.feature_loss(s, t, "l1")


def test_attention_kl_by_hand() -> None:
    t = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])  # [B=1, H=1, T=2, T=2], causal
    s = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    want = (0.0 + (0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5))) / 2
    assert float(losses.attention_kl(s, t)) == pytest.approx(want, rel=1e-5)


def test_task_loss_by_hand() -> None:
    logits = torch.tensor([[S, T]])
    targets = torch.tensor([[1, 0]])
    want = (-math.log(_softmax(S)[1]) - math.log(_softmax(T)[0])) / 2
    assert float(losses.task_loss(logits, targets)) == pytest.approx(want, rel=1e-5)


def test_combine_weights_terms() -> None:
    terms = {"kd": torch.tensor(2.0), "task": torch.tensor(3.0), "feature": torch.tensor(5.0)}
    assert float(losses.combine(terms, 1.0, 0.5, 0.1)) == pytest.approx(2 + 1.5 + 0.5)
    with pytest.raises(ValueError, match="zero"):
        losses.combine(terms, 0, 0, 0)


def test_layer_maps() -> None:
    assert kept_blocks(30, 15) == list(range(0, 30, 2))
    assert losses.layer_map(15, 30) == list(range(1, 30, 2))
    assert losses.layer_map(3, 3) == [0, 1, 2]
    assert losses.layer_map(2, 7)[-1] == 6
