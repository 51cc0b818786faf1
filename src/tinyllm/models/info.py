"""`model_info`: what `tinyllm info` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from tinyllm.models.anatomy import analyze
from tinyllm.models.size import param_count, size_bytes
from tinyllm.util.fs import dir_size


@dataclass
class ModelInfo:
    architecture: str
    model_type: str
    params: int
    linear_params: int  # in the linear layers of the decoder blocks
    layers: int
    hidden_size: int
    heads: int | None
    kv_heads: int | None
    vocab_size: int
    dtype: str
    size_in_memory_bytes: int
    size_on_disk_bytes: int | None
    roles: dict[str, int]  # linear role -> count over all blocks

    def to_dict(self) -> dict:
        return asdict(self)


def model_info(model: nn.Module) -> ModelInfo:
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    anatomy = analyze(model)
    roles: dict[str, int] = {}
    for site in anatomy.linears:
        roles[site.role] = roles.get(site.role, 0) + 1
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    heads = getattr(text_cfg, "num_attention_heads", None)
    return ModelInfo(
        architecture=(cfg.architectures or [type(model).__name__])[0],
        model_type=cfg.model_type,
        params=param_count(model),
        linear_params=anatomy.num_linear_weights,
        layers=len(anatomy.blocks),
        hidden_size=int(getattr(text_cfg, "hidden_size", 0)),
        heads=heads,
        kv_heads=getattr(text_cfg, "num_key_value_heads", heads),
        vocab_size=int(text_cfg.vocab_size),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        size_in_memory_bytes=size_bytes(model),
        size_on_disk_bytes=dir_size(source) if source.name and source.exists() else None,
        roles=roles,
    )
