"""Agreement with a reference model: per-token KL divergence and top-1 agreement."""

from __future__ import annotations

import torch


def common_vocab(ref: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trim both to the shared vocabulary (embedding matrices may be padded differently)."""
    v = min(ref.shape[-1], logits.shape[-1])
    return ref[..., :v], logits[..., :v]


# positions per step of token_kl and token_nll: their [positions, V] float32 temporaries stay
# small (128 MB each on a 128k vocabulary) however many windows a batch holds
CHUNK = 256


def chunks(t: torch.Tensor) -> list[tuple[int, slice]]:
    """(window, positions) pieces of a [B, T, ...] tensor, CHUNK positions each: slices are
    views, so a non-contiguous [B, T, V] (logits[:, :-1]) is never copied whole."""
    return [
        (b, slice(s, s + CHUNK)) for b in range(t.shape[0]) for s in range(0, t.shape[1], CHUNK)
    ]


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) at each position. [B, T, V], [B, T, V] -> [B, T] (or without B)"""
    if ref_logits.dim() == 2:
        return token_kl(ref_logits[None], logits[None])[0]
    ref_logits, logits = common_vocab(ref_logits, logits)
    kl = torch.zeros(ref_logits.shape[:2], device=ref_logits.device)
    for b, pos in chunks(ref_logits):  # position by position the same arithmetic
        ref_lp = torch.log_softmax(ref_logits[b, pos].float(), dim=-1)
        lp = torch.log_softmax(logits[b, pos].float(), dim=-1)
        kl[b, pos] = (ref_lp.exp() * (ref_lp - lp)).sum(dim=-1)
    return kl.clamp_min(0.0)  # rounding can give -1e-9 where the two agree


def top1_agree(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether both models rank the same token first at each position. -> [B, T] bool"""
    ref_logits, logits = common_vocab(ref_logits, logits)
    return ref_logits.argmax(dim=-1) == logits.argmax(dim=-1)
