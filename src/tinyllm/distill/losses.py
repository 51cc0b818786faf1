"""Distillation losses: pure functions on logits and hidden states.

Shapes: logits [N, V] or [B, T, V] (any leading dims, flattened); hidden states [B, T, D].
Every loss is a mean over positions, so its size does not depend on batch or sequence length.

- `kd_loss`: soft targets (Hinton et al. 2015): T^2 * KL(p_t || p_s) on softmax(logits / T).
  `kind="reverse"` gives KL(p_s || p_t) (mode-seeking, as in MiniLLM), `kind="js"` the
  Jensen-Shannon divergence. The T^2 factor keeps gradient sizes comparable across temperatures.
- `kd_loss_topk`: forward KL against a teacher known only by its top-k logits (the on-disk cache),
  over k + 1 outcomes (the k tokens and "any other token") when the teacher's mass outside its
  top k is known; otherwise the teacher is renormalised over its k tokens, which drops its tail
  (11% of the mass at k = 64 on SmolLM2 and Wikipedia) and pulls the student's tail to zero.
- `feature_loss`: hidden-state matching, MSE relative to the teacher's mean square (so layers with
  large activations do not dominate) or 1 - cosine similarity per position.
- `attention_kl`: KL between attention maps, averaged over heads and query positions.
- `task_loss`: next-token cross-entropy on the ground truth.
- `combine`: L = alpha * KD + beta * task + gamma * feature (+ delta * attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KD_KINDS = ("forward", "reverse", "js")
FEATURE_KINDS = ("mse", "cosine")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities. [N, V] -> [N]"""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, kind: str = "forward"
) -> torch.Tensor:
    """Soft-target loss between student and teacher logits, times T^2. -> scalar"""
    if kind not in KD_KINDS:
        raise ValueError(f"kd kind must be one of {KD_KINDS}, got {kind!r}")
    t = temperature
    log_s = F.log_softmax(_flat(student) / t, dim=-1)  # [N, V]
    log_t = F.log_softmax(_flat(teacher) / t, dim=-1).detach()
    if kind == "forward":
        per = _kl(log_t, log_s)
    elif kind == "reverse":
        per = _kl(log_s, log_t)
    else:
        log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - torch.log(torch.tensor(2.0))
        per = 0.5 * _kl(log_t, log_m) + 0.5 * _kl(log_s, log_m)
    return per.mean() * t * t


def kd_loss_topk(
    student: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    temperature: float = 1.0,
    rest: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL to a teacher given by its top-k logits `values` at vocabulary `indices`.

    student [..., V]; values, indices [..., k]; rest [...]: log of the teacher's probability
    outside its top k (at temperature 1). With `rest` the KL runs over k + 1 outcomes, the k
    tokens and the rest of the vocabulary, so the student keeps the teacher's tail mass; it
    equals `kd_loss` when k = V and is zero (with zero gradient) when the student is the
    teacher. Without `rest` (or at another temperature, where it is unknown) the teacher is
    renormalised over its k tokens. -> scalar
    """
    t = temperature
    log_s = F.log_softmax(_flat(student) / t, dim=-1)  # [N, V]
    log_t = F.log_softmax(_flat(values) / t, dim=-1)  # [N, k]
    idx = indices.reshape(-1, indices.shape[-1]).long()
    log_s_k = log_s.gather(-1, idx)  # [N, k]
    if rest is None or t != 1.0:
        return _kl(log_t, log_s_k).mean() * t * t
    r = rest.reshape(-1).float().clamp_max(0.0)  # [N]
    top = _kl(log_t + torch.log1p(-r.exp().clamp_max(1 - 1e-6))[:, None], log_s_k)
    has = torch.isfinite(r)  # k = V leaves no rest: its term is 0 (kept NaN-free for autograd)
    log_s_rest = log_s.scatter(-1, idx, float("-inf")).logsumexp(-1)
    r, log_s_rest = torch.where(has, r, 0.0), torch.where(has, log_s_rest, 0.0)
    return (top + torch.where(has, r.exp() * (r - log_s_rest), 0.0)).mean()


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Hidden-state distance. [B, T, D] each (student already projected to D). -> scalar"""
    s, t = _flat(student), _flat(teacher).detach()
    if kind == "mse":
        return ((s - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12)
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
    raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {kind!r}")


def attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) between attention probabilities. [B, H, T, T] each -> scalar

    Rows are distributions over keys; masked keys have probability 0 in both and add nothing.
    """
    s = student.float().clamp_min(1e-12)
    t = teacher.float().detach()
    per = (t * (t.clamp_min(1e-12).log() - s.log())).sum(-1)  # [B, H, T]
    return per.mean()


def task_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits [..., V] already aligned with `targets` [...]. -> scalar"""
    return F.cross_entropy(_flat(logits), targets.reshape(-1))


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher block whose output each student block's output is matched to: evenly spaced,
    the last student block to the last teacher block (student i -> teacher ((i+1)*Lt/Ls) - 1)."""
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]


def combine(
    terms: dict[str, torch.Tensor], alpha: float, beta: float, gamma: float, delta: float = 0.0
) -> torch.Tensor:
    """alpha * kd + beta * task + gamma * feature + delta * attention, over the terms present."""
    weights = {"kd": alpha, "task": beta, "feature": gamma, "attention": delta}
    total = sum(weights[k] * v for k, v in terms.items() if weights[k])
    if not isinstance(total, torch.Tensor):
        raise ValueError("every loss weight is zero: set alpha, beta or gamma above 0")
    return total
