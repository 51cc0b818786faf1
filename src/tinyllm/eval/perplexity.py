"""Next-token negative log-likelihood, the basis of perplexity."""

from __future__ import annotations

import torch


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of each target under the logits that predict it. [B, T, V], [B, T] -> [B, T]"""
    from tinyllm.eval.divergence import chunks

    if logits.dim() == 2:
        return token_nll(logits[None], targets[None])[0]
    nll = torch.zeros(targets.shape, device=logits.device)
    for b, pos in chunks(logits):  # a float32 copy of CHUNK positions at a time
        part = logits[b, pos].float()
        picked = part.gather(-1, targets[b, pos].unsqueeze(-1)).squeeze(-1)
        nll[b, pos] = torch.logsumexp(part, dim=-1) - picked  # no log-softmax copy
    return nll


def perplexity(total_nll: float, tokens: int) -> float:
    return float(torch.tensor(total_nll / tokens, dtype=torch.float64).exp())
