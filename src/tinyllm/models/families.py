"""Everything tinyllm knows about a model family, in one table keyed by `config.model_type`.

A `Family` says where a decoder block's parts are (`roles`: role -> module name inside a block),
where the embedding, final norm and head are, which op feeds which projections (the scaling
groups AWQ and SmoothQuant fold scales through), how llama.cpp names the tensors (`gguf`, with
`{bid}` templates for the block index), and whether the ONNX graph and the lean runtime support
it. Quantization, export and the runtime read this table; none keeps a copy.

A model type not in the table gets `derived_family(model)`: the Llama layout, restricted to the
modules its blocks really have (found with `named_modules()`), no GGUF names and no ONNX or
runtime support. Methods that fold scales still check every norm group on the live graph before
using it (quant.awq.checked_groups).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from tinyllm.models.anatomy import find_blocks

# role -> local module name inside a decoder block (Llama, Mistral, Qwen2)
LLAMA_ROLES: Mapping[str, str] = {
    "attn_norm": "input_layernorm",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
GEMMA3_ROLES: Mapping[str, str] = {
    **LLAMA_ROLES,
    "mlp_norm": "pre_feedforward_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
}
# Which op feeds which linears, by role: a norm entry is checked on the live graph before use
# (its output must be the very tensor the linears receive); linear -> linear entries pass through
# attention (v -> o) or an elementwise product (up -> down), which keep channels in place, and
# are used only when the shapes line up (not v -> o under grouped-query attention).
SCALING_ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attn_norm", ("q", "k", "v")),
    ("v", ("o",)),
    ("mlp_norm", ("gate", "up")),
    ("up", ("down",)),
)
# role -> llama.cpp tensor name (without .weight/.bias)
LLAMA_GGUF: Mapping[str, str] = {
    "attn_norm": "blk.{bid}.attn_norm",
    "q": "blk.{bid}.attn_q",
    "k": "blk.{bid}.attn_k",
    "v": "blk.{bid}.attn_v",
    "o": "blk.{bid}.attn_output",
    "mlp_norm": "blk.{bid}.ffn_norm",
    "gate": "blk.{bid}.ffn_gate",
    "up": "blk.{bid}.ffn_up",
    "down": "blk.{bid}.ffn_down",
}
GEMMA3_GGUF: Mapping[str, str] = {
    **LLAMA_GGUF,
    "post_attn_norm": "blk.{bid}.post_attention_norm",
    "post_mlp_norm": "blk.{bid}.post_ffw_norm",
    "q_norm": "blk.{bid}.attn_q_norm",
    "k_norm": "blk.{bid}.attn_k_norm",
}


def gemma3_gguf_limits(cfg: Any) -> list[str]:
    """What llama.cpp's gemma3 graph fixes and a config could set otherwise."""
    problems = []
    head_dim = cfg.head_dim
    if getattr(cfg, "query_pre_attn_scalar", head_dim) != head_dim:
        problems.append(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} != head_dim {head_dim}")
    local = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention", {})
    if local.get("rope_theta", 10000.0) != 10000.0:
        problems.append(f"sliding-layer rope theta {local['rope_theta']} != 10000")
    pattern = [
        "full_attention" if i % 6 == 5 else "sliding_attention" for i in range(len(cfg.layer_types))
    ]
    if list(cfg.layer_types) != pattern:
        problems.append("layer types differ from llama.cpp's 5 sliding : 1 full pattern")
    return problems


@dataclass(frozen=True)
class GGUFNames:
    """How llama.cpp names and lays out a family's tensors."""

    arch: str  # llama.cpp architecture name
    names: Mapping[str, str]  # role -> tensor name with a {bid} template
    permute_qk: bool = False  # llama.cpp's llama graph uses interleaved rotary pairs
    extra: Mapping[str, str] = field(default_factory=dict)  # GGUF key suffix -> config attribute
    limits: Callable[[Any], list[str]] | None = None  # config settings llama.cpp cannot follow
    rope_types: tuple[str, ...] = ("default",)  # RoPE kinds the writer can express; () = any


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring)."""

    model_type: str
    roles: Mapping[str, str] = field(default_factory=lambda: dict(LLAMA_ROLES))
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    scaling: tuple[tuple[str, tuple[str, ...]], ...] = SCALING_ROLES
    norm_offset: float = 0.0  # norms scale by (offset + weight) (Gemma: 1)
    gguf: GGUFNames | None = None  # None: no GGUF export
    onnx: bool = False  # the ONNX graph (RMSNorm + rotary + GQA + SwiGLU) fits it
    runtime: bool = False  # the lean runtime's forward fits it (else the transformers fallback)
    # How the lean runtime treats `config.sliding_window`: "none" (the family has none),
    # "config" (every layer attends within it, Mistral), "refuse" (a window switched on by
    # `use_sliding_window` is not supported: the transformers fallback runs it, Qwen2),
    # "layers" (the layers `config.layer_types` names "sliding_attention" do, Gemma 3).
    window: Literal["none", "config", "refuse", "layers"] = "none"

    def local(self, role: str) -> str:
        """The module name inside a block that plays `role`."""
        return self.roles[role]

    def scaling_groups(self) -> list[tuple[str, list[str]]]:
        """(producer, consumers) by local module name, for the roles this family has."""
        return [
            (self.roles[prev], [self.roles[c] for c in consumers])
            for prev, consumers in self.scaling
            if prev in self.roles and all(c in self.roles for c in consumers)
        ]

    def gguf_block_names(self) -> dict[str, str]:
        """Local module name inside a block -> GGUF name template (``blk.{bid}.attn_q``)."""
        if self.gguf is None:
            return {}
        return {self.roles[r]: name for r, name in self.gguf.names.items() if r in self.roles}


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama",
        gguf=GGUFNames("llama", LLAMA_GGUF, permute_qk=True, rope_types=("default", "llama3")),
        onnx=True,
        runtime=True,
    ),
    "qwen2": Family(
        "qwen2", gguf=GGUFNames("qwen2", LLAMA_GGUF), onnx=True, runtime=True, window="refuse"
    ),
    "mistral": Family(
        "mistral",
        gguf=GGUFNames("llama", LLAMA_GGUF, permute_qk=True),
        onnx=True,
        runtime=True,
        window="config",
    ),
    "gemma3_text": Family(
        "gemma3_text",
        roles=GEMMA3_ROLES,
        norm_offset=1.0,
        gguf=GGUFNames(
            "gemma3",
            GEMMA3_GGUF,
            extra={"attention.sliding_window": "sliding_window"},
            limits=gemma3_gguf_limits,
            rope_types=(),
        ),
        runtime=True,
        window="layers",
    ),
}


def supporting(feature: str) -> list[str]:
    """Model types whose family supports `feature` ("gguf", "onnx" or "runtime"), table order."""
    return [t for t, f in FAMILIES.items() if getattr(f, feature)]


def derived_family(model: nn.Module) -> Family:
    """A family for a model type not in the table, from its module graph: the Llama roles whose
    modules its first decoder block has; nothing exported or run by the lean runtime."""
    _, blocks = find_blocks(model)
    present = {name for name, _ in blocks[0].named_modules()}
    roles = {r: local for r, local in LLAMA_ROLES.items() if local in present}
    model_type = getattr(model.config, "model_type", "?")
    return Family(model_type, roles=roles)


def family_of(model: nn.Module) -> Family:
    """The family of a loaded model: its table entry, or one derived from its graph."""
    fam = FAMILIES.get(getattr(model.config, "model_type", None))
    return fam if fam is not None else derived_family(model)
