"""Quantized token embeddings (and output head): asked for explicitly, never by default.

In small models the vocabulary table is a large share of the weights (SmolLM2-135M: 28M of 135M
parameters, tied to the output head), so a size budget often needs it quantized too. RTN on
groups along the hidden dimension (an embedding row is looked up whole); a tied head shares the
same record, so the table is stored once. Untied heads get their own record.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from tinyllm.core.steps import Context, register
from tinyllm.errors import ConfigError
from tinyllm.kernels.qlinear import QuantEmbedding, QuantLinear, replace_embedding, set_module
from tinyllm.quant.common import WeightQuant
from tinyllm.quant.rtn import RTN, rtn_quantize


class Embeddings(WeightQuant):
    """RTN of the token embedding table and the output head.

    Default: 8 bits, one scale per row (a row is one token's vector): the head then runs on
    PyTorch's int8 kernel, and GGUF stores it as q8_0 exactly. Use groups of 32 below 8 bits.
    """

    bits: int = 8
    group_size: int = -1
    sym: bool = True
    mse: bool = Field(True, description="search each group's clipping range")


def embed_step(bits: int) -> Embeddings:
    """The Embeddings step tinyllm uses for a bit width: per row at 8 bits, groups of 32 below."""
    return Embeddings(bits=bits, group_size=-1 if bits >= 8 else 32)


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def tied_head(model: nn.Module) -> bool:
    """True when the output head shares the embedding table (float or quantized)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None:
        return False
    a, b = getattr(head, "qweight", None), getattr(emb, "qweight", None)
    if a is not None or b is not None:
        return a is b
    return head.weight is emb.weight


@register(Embeddings)
def apply(model: nn.Module, cfg: Embeddings, ctx: Context) -> None:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or isinstance(emb, QuantEmbedding):
        raise ConfigError("the embeddings are already quantized (or the model has none)")
    if not isinstance(emb, nn.Embedding):
        raise ConfigError(f"cannot quantize an embedding of type {type(emb).__name__}")
    tied = tied_head(model)
    rtn = RTN(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, mse=cfg.mse)
    w = emb.weight.detach().float()
    if cfg.group_size != -1 and w.shape[1] % cfg.group_size:
        raise ConfigError(
            f"group size {cfg.group_size} does not divide the embedding width {w.shape[1]}"
        )
    qw = rtn_quantize(w, rtn)
    errors = ctx.report.setdefault("layer_errors", {})
    errors[module_name(model, emb)] = _rel_error(w, qw.dequantize())
    head_name = module_name(model, head) if head is not None else None
    replace_embedding(model, module_name(model, emb), qw)
    if head is None or isinstance(head, QuantLinear):
        return
    if tied:
        set_module(model, head_name, QuantLinear(qw, getattr(head, "bias", None)))
        return
    hw = head.weight.detach().float()
    hq = rtn_quantize(hw, rtn)
    errors[head_name] = _rel_error(hw, hq.dequantize())
    set_module(model, head_name, QuantLinear(hq, getattr(head, "bias", None)))


def _rel_error(w, wq) -> float:
    return float((w - wq).pow(2).sum() / w.pow(2).sum().clamp_min(1e-12))
