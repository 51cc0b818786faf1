"""Agreement with a reference model: per-token KL divergence and top-1 agreement."""

from __future__ import annotations

import torch


def common_vocab(ref: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trim both to the shared vocabulary (embedding matrices may be padded differently)."""
    v = min(ref.shape[-1], logits.shape[-1])
    return ref[..., :v], logits[..., :v]


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) at each position. [B, T, V], [B, T, V] -> [B, T]"""
    ref_logits, logits = common_vocab(ref_logits, logits)
    ref_lp = torch.log_softmax(ref_logits.float(), dim=-1)
    lp = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(dim=-1)
    return kl.clamp_min(0.0)  # rounding can give -1e-9 where the two agree


def top1_agree(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether both models rank the same token first at each position. -> [B, T] bool"""
    ref_logits, logits = common_vocab(ref_logits, logits)
    return ref_logits.argmax(dim=-1) == logits.argmax(dim=-1)
