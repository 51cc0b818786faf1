"""Find decoder blocks, their linear layers (with roles), norms, embeddings and head from the graph.

Nothing here names a model family. Blocks are the longest `nn.ModuleList` of identical modules
that hold linear layers; roles come from a small table of conventional layer names with a
structural fallback (position inside the attention or MLP submodule, and shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tinyllm.errors import ArchitectureError

# Conventional leaf names -> role. Data, not code: extend it when a family uses a new name.
ROLE_NAMES: dict[str, str] = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "out_proj": "o",
    "qkv_proj": "qkv",
    "query_key_value": "qkv",
    "Wqkv": "qkv",
    "c_attn": "qkv",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "gate_up_proj": "gate_up",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
    "fc1": "fc1",
    "fc2": "fc2",
    "c_fc": "fc1",
    "dense_h_to_4h": "fc1",
    "dense_4h_to_h": "fc2",
}
ATTENTION_ROLES = {"q", "k", "v", "o", "qkv", "attn_in", "attn_out"}


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a tinyllm replacement of one (which sets `is_tinyllm_linear`)."""
    return isinstance(module, nn.Linear) or getattr(module, "is_tinyllm_linear", False)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


@dataclass
class LinearSite:
    """One linear layer inside a decoder block."""

    name: str  # full module name: model.layers.3.self_attn.q_proj
    block: int
    local: str  # name inside its block: self_attn.q_proj
    role: str
    module: nn.Module

    @property
    def is_attention(self) -> bool:
        return self.role in ATTENTION_ROLES


@dataclass
class Anatomy:
    blocks_path: str
    blocks: list[nn.Module]
    linears: list[LinearSite]
    norms: dict[str, nn.Module] = field(default_factory=dict)
    embedding: nn.Module | None = None
    head: nn.Module | None = None

    def block_linears(self, index: int) -> list[LinearSite]:
        return [s for s in self.linears if s.block == index]

    @property
    def num_linear_weights(self) -> int:
        return sum(s.module.in_features * s.module.out_features for s in self.linears)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList whose children are all of one class and contain linear layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 1:
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        if not any(is_linear(m) for m in mod[0].modules()):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise ArchitectureError(
            f"no decoder blocks found in {type(model).__name__}: tinyllm looks for a repeated "
            "nn.ModuleList of identical blocks that contain linear layers"
        )
    return best


def _container_kind(block: nn.Module, local: str) -> str:
    """'attention' or 'mlp', from the class or attribute name of the linear's parent module."""
    parent_name = local.rsplit(".", 1)[0] if "." in local else ""
    parent = block.get_submodule(parent_name) if parent_name else block
    text = (type(parent).__name__ + " " + parent_name).lower()
    return "attention" if ("attn" in text or "attention" in text) else "mlp"


def _fallback_roles(block: nn.Module, locals_: list[str], hidden: int) -> dict[str, str]:
    """Roles from structure: inputs of a submodule read the hidden state, outputs write it."""
    roles = {}
    for local in locals_:
        mod = block.get_submodule(local)
        kind = _container_kind(block, local)
        prefix = "attn" if kind == "attention" else "mlp"
        writes_hidden = mod.out_features == hidden and mod.in_features != hidden
        roles[local] = f"{prefix}_out" if writes_hidden else f"{prefix}_in"
    return roles


def _hidden_size(model: nn.Module, blocks: nn.ModuleList) -> int:
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if hidden:
        return int(hidden)
    first = next(m for m in blocks[0].modules() if is_linear(m))
    return int(first.in_features)


def analyze(model: nn.Module) -> Anatomy:
    """Describe a causal LM's structure from its module graph."""
    blocks_path, blocks = find_blocks(model)
    hidden = _hidden_size(model, blocks)
    linears: list[LinearSite] = []
    for i, block in enumerate(blocks):
        locals_ = [n for n, m in block.named_modules() if n and is_linear(m)]
        fallback = _fallback_roles(block, locals_, hidden)
        for local in locals_:
            role = ROLE_NAMES.get(local.rsplit(".", 1)[-1], fallback[local])
            linears.append(
                LinearSite(f"{blocks_path}.{i}.{local}", i, local, role, block.get_submodule(local))
            )
    if not linears:
        raise ArchitectureError(f"no linear layers found in the blocks of {type(model).__name__}")
    norms = {n: m for n, m in model.named_modules() if n and is_norm(m)}
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    return Anatomy(
        blocks_path=blocks_path,
        blocks=list(blocks),
        linears=linears,
        norms=norms,
        embedding=get_in() if get_in else None,
        head=get_out() if get_out else None,
    )
