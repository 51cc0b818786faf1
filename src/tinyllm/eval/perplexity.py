"""Next-token negative log-likelihood, the basis of perplexity."""

from __future__ import annotations

import torch


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of each target under the logits that predict it. [B, T, V], [B, T] -> [B, T]"""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return torch.logsumexp(logits, dim=-1) - picked  # one read of the logits, no log-softmax copy


def perplexity(total_nll: float, tokens: int) -> float:
    return float(torch.tensor(total_nll / tokens, dtype=torch.float64).exp())
