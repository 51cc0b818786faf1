"""One check the method tests share: quantize a tiny random Llama, compare its logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tests.conftest import tiny_model
from tinyllm.core.steps import Step
from tinyllm.kernels.qlinear import QuantLinear
from tinyllm.quant.api import quantize


@dataclass
class TinyRun:
    model: nn.Module  # quantized in place
    report: dict
    x: torch.Tensor  # the tokens both forwards saw [2, 24]
    ref: torch.Tensor  # the float model's logits on x
    got: torch.Tensor  # the quantized model's logits on x

    def quant_linears(self) -> int:
        return sum(isinstance(m, QuantLinear) for m in self.model.modules())

    def cosine(self) -> float:
        """Cosine similarity of the quantized model's logits to the float model's."""
        return float(
            torch.nn.functional.cosine_similarity(self.got.flatten(), self.ref.flatten(), dim=0)
        )


def quantize_tiny_model(cfg: Step, vocab: int = 320) -> TinyRun:
    """Quantize conftest's tiny two-block Llama (14 block linears) with `cfg`, calibrated on 8
    random windows of 32 tokens where the method calibrates."""
    model = tiny_model(vocab=vocab)
    x = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        ref = model(x).logits
    calib = torch.randint(0, vocab, (8, 32))
    report = quantize(model, cfg, calib=calib if cfg.calibrated else None, batch_size=4)
    with torch.no_grad():
        got = model(x).logits
    return TinyRun(model, report, x, ref, got)
