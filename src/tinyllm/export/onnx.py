"""ONNX export for onnxruntime: a Llama-family decoder with KV-cache inputs and outputs.

The graph is built op by op with `onnx.helper` from the model's own tensors, so every name and
layout is ours: RMSNorm, rotary embedding (cos/sin tables gathered by position), grouped-query
attention over the concatenation of the past and new keys/values, SwiGLU MLP, the head. Inputs:
`input_ids` [batch, seq] and `past_keys` / `past_values` [layers, batch, kv_heads, past, head_dim]
(past may be 0); outputs: `logits` [batch, seq, vocab], `present_keys` / `present_values` with
past + seq positions. Positions continue from the past length.

Types: `fp32` writes every linear as a float MatMul (quantized layers dequantized). `q4` / `q8`
write tinyllm's 4-bit / 8-bit records as onnxruntime's `com.microsoft.MatMulNBits` with our packed
codes, scales and zero points unchanged (blocks of 32, 64 or 128); other layers stay float, with a
warning (or refused with `strict`). `w8a8` writes INT8 weight-and-activation layers (int8-static,
int8-dynamic, smoothquant) as standard integer ops: the input quantized by `QuantizeLinear`
(static scales, per tensor or per channel) or by Abs/ReduceMax/Div/Round/Clip/Cast (dynamic, per
token), `MatMulInteger` on our int8 weight codes, then the zero-point correction and the rescale.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tinyllm.errors import ArchitectureError, ConfigError
from tinyllm.kernels.qlinear import ActQuantLinear, QuantLinear
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.models.anatomy import analyze
from tinyllm.models.families import FAMILIES, supporting
from tinyllm.util.fs import atomic_dir

log = logging.getLogger(__name__)

TYPES = {"fp32": None, "q4": 4, "q8": 8, "w8a8": "w8a8"}
OPSET = 21
MS_OPSET = 1


def why_not_nbits(qw: QuantizedWeight, bits: int) -> str | None:
    """None when MatMulNBits holds qw exactly at `bits`, else the reason."""
    if qw.codebook is not None:
        return "codebook (NF4) values are not on an integer grid"
    if qw.kquant is not None:
        return (
            f"{qw.kquant} grids have float mins and super-block scales (export as GGUF {qw.kquant})"
        )
    if qw.bits != bits:
        return f"{qw.bits}-bit codes, not {bits}-bit"
    if qw.perm is not None:
        return "columns are permuted (act-order without static groups)"
    if qw.group_size not in (32, 64, 128):
        return f"group size {qw.group_size}: MatMulNBits takes blocks of 32, 64 or 128 here"
    return None


@dataclass
class Graph:
    """Nodes and initializers being collected, with unique names."""

    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    count: int = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def ints(self, *values: int) -> str:
        return self.const("shape", np.array(values, dtype=np.int64))


@dataclass
class ExportReport:
    nbits: list[str] = field(default_factory=list)
    float_layers: dict[str, str] = field(default_factory=dict)  # name -> why not MatMulNBits


def why_not_w8a8(mod: nn.Module) -> str | None:
    """None when the layer is an INT8 weight-and-activation layer, else the reason."""
    if not isinstance(mod, ActQuantLinear):
        return "weight-only or float layer (no activation quantization)"
    if mod.kernel != "int8_mm":
        return f"{mod.act.dtype} activations are simulated, not integer"
    return None


def _why_not(mod: nn.Module, bits: int | str | None) -> str | None:
    if bits == "w8a8":
        return why_not_w8a8(mod)
    if not isinstance(mod, QuantLinear):
        return "float" if not bits else "not a weight-only quantized layer"
    return why_not_nbits(mod.qweight, bits) if bits else "float"


def _linear(g: Graph, x: str, mod: nn.Module, name: str, bits, rep, strict) -> str:
    """x [..., in] @ W^T (+ b): MatMulNBits / MatMulInteger for a carried record, else a float
    MatMul."""
    quantized = isinstance(mod, QuantLinear | ActQuantLinear)
    reason = _why_not(mod, bits)
    if quantized and bits and reason is not None:
        if strict:
            raise ConfigError(f"{name}: cannot write as {bits} ({reason})")
        rep.float_layers[name] = reason
    if reason is None:
        y = _w8a8(g, x, mod, name) if bits == "w8a8" else _matmul_nbits(g, x, mod.qweight, name)
        rep.nbits.append(name)
    else:
        w = mod.dequantized_weight() if quantized else mod.weight.detach().float()
        if isinstance(mod, ActQuantLinear) and bits is None:
            rep.float_layers[name] = f"{mod.act.describe()} input written as float"
        y = g.op("MatMul", [x, g.const(f"{name}.weight_t", w.t().numpy())])
    bias = getattr(mod, "bias", None)
    if bias is not None:
        y = g.op("Add", [y, g.const(f"{name}.bias", bias.detach().float().numpy())])
    return y


def _matmul_nbits(g: Graph, x: str, qw: QuantizedWeight, name: str) -> str:
    n, k = qw.shape
    blocks = k // qw.group_size
    # our bit stream is row-major with element 2i in the low nibble: exactly B's layout
    packed = qw.packed.numpy().reshape(n, blocks, qw.group_size * qw.bits // 8)
    inputs = [x, g.const(f"{name}.qweight", packed)]
    inputs.append(g.const(f"{name}.scales", qw.scale.float().numpy().reshape(-1)))
    zero = qw.zero.numpy().astype(np.uint8)  # [n, blocks]
    if not qw.sym:
        if qw.bits == 4:  # two zero points per byte, low nibble first, rows padded to bytes
            zero = np.pad(zero, ((0, 0), (0, blocks % 2)))
            zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
        inputs.append(g.const(f"{name}.zero_points", zero.reshape(-1)))
    attrs = dict(K=k, N=n, bits=qw.bits, block_size=qw.group_size)
    return g.op("MatMulNBits", inputs, domain="com.microsoft", **attrs)


def _w8a8(g: Graph, x: str, mod: ActQuantLinear, name: str) -> str:
    """Integer W8A8 layer: quantize x, MatMulInteger with the int8 weight codes, rescale."""
    act = mod.act
    w_t = mod.w_i8.t().contiguous().numpy()  # int8 [in, out]
    w_scale = mod.w_i8_scale.reshape(-1).numpy()  # [out]
    if act.dynamic:  # per token: s = max|x| / 127 over the last axis
        amax = g.op("ReduceMax", [g.op("Abs", [x]), g.ints(-1)], keepdims=1)
        sx = g.op("Div", [g.op("Max", [amax, _f32(g, 1e-8)]), _f32(g, 127.0)])
        q = g.op("Round", [g.op("Div", [x, sx])])
        q = g.op("Cast", [g.op("Clip", [q, _f32(g, -127.0), _f32(g, 127.0)])], to=TensorProto.INT8)
        scale = g.op("Mul", [sx, g.const(f"{name}.w_scale", w_scale)])
    else:  # static: scale (and zero point) from calibration; per channel folded into W
        zero = act.zero if act.zero is not None else torch.zeros_like(act.scale, dtype=torch.int32)
        axis = {"axis": -1} if act.granularity == "channel" else {}
        xs = act.scale.numpy().astype(np.float32)
        xz = zero.numpy().astype(np.int8)
        if act.granularity != "channel":
            xs, xz = xs.reshape(()), xz.reshape(())
        q = g.op(
            "QuantizeLinear",
            [x, g.const(f"{name}.x_scale", xs), g.const(f"{name}.x_zero", xz)],
            **axis,
        )
        factor = w_scale if act.granularity == "channel" else w_scale * float(act.scale)
        scale = g.const(f"{name}.out_scale", factor.astype(np.float32))
    acc = g.op("MatMulInteger", [q, g.const(f"{name}.w_int8", w_t)])  # int32 [..., out]
    if mod.zero_term is not None:
        acc = g.op("Sub", [acc, g.const(f"{name}.zero_term", mod.zero_term.reshape(-1).numpy())])
    return g.op("Mul", [g.op("Cast", [acc], to=TensorProto.FLOAT), scale])


def _f32(g: Graph, value: float) -> str:
    return g.const("c", np.array(value, dtype=np.float32))


def _rms_norm(g: Graph, x: str, weight: torch.Tensor, eps: float) -> str:
    var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.ints(-1)], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const("eps", np.float32(eps))])])
    inv = g.op("Reciprocal", [std])
    return g.op("Mul", [g.op("Mul", [x, inv]), g.const("norm", weight.detach().float().numpy())])


def _heads(g: Graph, x: str, n: int, d: int) -> str:
    """[B, S, n*d] -> [B, n, S, d]"""
    return g.op("Transpose", [g.op("Reshape", [x, g.ints(0, 0, n, d)])], perm=[0, 2, 1, 3])


def _rotary(g: Graph, x: str, cos: str, sin: str, d: int) -> str:
    """x * cos + rotate_half(x) * sin, x [B, n, S, d], cos/sin [B, 1, S, d]."""
    lo, hi = g.op("Split", [x, g.ints(d // 2, d // 2)], n_out=2, axis=-1)
    rot = g.op("Concat", [g.op("Neg", [hi]), lo], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])


def _repeat_kv(g: Graph, x: str, rep: int, kv: int, d: int) -> str:
    """[B, kv, T, d] -> [B, kv*rep, T, d] (each KV head serves rep query heads)."""
    if rep == 1:
        return x
    shape = g.op("Shape", [x])
    b, t = g.op("Gather", [shape, g.ints(0)]), g.op("Gather", [shape, g.ints(2)])
    target = g.op("Concat", [b, g.ints(kv, rep), t, g.ints(d)], axis=0)
    expanded = g.op("Expand", [g.op("Unsqueeze", [x, g.ints(2)]), target])
    return g.op("Reshape", [expanded, g.op("Concat", [b, g.ints(kv * rep), t, g.ints(d)], axis=0)])


def _past(g: Graph, name: str, i: int) -> str:
    """Layer i of a stacked cache input: [L, B, kv, P, d] -> [B, kv, P, d]."""
    return g.op("Squeeze", [g.op("Gather", [name, g.ints(i)], axis=0), g.ints(0)])


def _positions(g: Graph) -> tuple[str, str]:
    """Positions past .. past + S - 1 and the additive causal mask [S, past + S]."""
    past = g.op("Squeeze", [g.op("Gather", [g.op("Shape", ["past_keys"]), g.ints(3)])])
    seq = g.op("Squeeze", [g.op("Gather", [g.op("Shape", ["input_ids"]), g.ints(1)])])
    total = g.op("Add", [past, seq])
    one = g.const("one", np.int64(1))
    pos = g.op("Range", [past, total, one])
    keys = g.op("Range", [g.const("zero", np.int64(0)), total, one])
    col, row = g.op("Unsqueeze", [keys, g.ints(0)]), g.op("Unsqueeze", [pos, g.ints(1)])
    allowed = g.op("LessOrEqual", [col, row])  # query i sees keys j <= past + i
    shut = g.const("shut", np.float32(-1e30))
    return pos, g.op("Where", [allowed, g.const("open", np.float32(0)), shut])


def _rope_tables(cfg: Any, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_positions, head_dim] as Hugging Face's default rotary computes them."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ArchitectureError(
            f"rope scaling '{params['rope_type']}' is not in the ONNX graph yet"
        )
    theta = getattr(cfg, "rope_theta", None) or params.get("rope_theta", 10000.0)
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    t = torch.arange(cfg.max_position_embeddings).float()
    emb = torch.cat([torch.outer(t, inv)] * 2, dim=-1)
    return emb.cos().numpy(), emb.sin().numpy()


@dataclass(frozen=True)
class Dims:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float


@dataclass
class Layer:
    """One decoder block being written: its modules and how to emit its linears."""

    g: Graph
    block: nn.Module
    roles: Mapping[str, str]  # role -> local module name (models/families.py)
    prefix: str
    bits: int | None
    rep: ExportReport
    strict: bool

    def linear(self, x: str, role: str) -> str:
        mod = self.block.get_submodule(self.roles[role])
        name = f"{self.prefix}.{self.roles[role]}"
        return _linear(self.g, x, mod, name, self.bits, self.rep, self.strict)

    def norm(self, x: str, role: str, eps: float) -> str:
        return _rms_norm(self.g, x, self.block.get_submodule(self.roles[role]).weight, eps)


def _block(
    layer: Layer, x: str, i: int, dims: Dims, cos: str, sin: str, mask: str
) -> tuple[str, str, str]:
    """One decoder block; returns the new hidden state and this layer's full keys and values."""
    g, nh, kv, d = layer.g, dims.heads, dims.kv_heads, dims.head_dim
    h = layer.norm(x, "attn_norm", dims.eps)
    q = _rotary(g, _heads(g, layer.linear(h, "q"), nh, d), cos, sin, d)
    k = _rotary(g, _heads(g, layer.linear(h, "k"), kv, d), cos, sin, d)
    v = _heads(g, layer.linear(h, "v"), kv, d)
    k = g.op("Concat", [_past(g, "past_keys", i), k], axis=2)  # [B, kv, past + S, d]
    v = g.op("Concat", [_past(g, "past_values", i), v], axis=2)
    kt = g.op("Transpose", [_repeat_kv(g, k, nh // kv, kv, d)], perm=[0, 1, 3, 2])
    scale = g.const("scale", np.float32(1 / math.sqrt(d)))
    scores = g.op("Mul", [g.op("MatMul", [q, kt]), scale])  # [B, nh, S, past + S]
    probs = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1)
    ctx = g.op("MatMul", [probs, _repeat_kv(g, v, nh // kv, kv, d)])  # [B, nh, S, d]
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.ints(0, 0, nh * d)])
    x = g.op("Add", [x, layer.linear(ctx, "o")])
    h = layer.norm(x, "mlp_norm", dims.eps)
    gate = layer.linear(h, "gate")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])  # SiLU
    x = g.op("Add", [x, layer.linear(g.op("Mul", [act, layer.linear(h, "up")]), "down")])
    return x, k, v


def build_graph(model: nn.Module, bits: int | None, strict: bool) -> tuple[Any, ExportReport]:
    cfg = model.config
    fam = FAMILIES.get(cfg.model_type)
    if fam is None or not fam.onnx:  # one RMSNorm + rotary + GQA + SwiGLU graph
        raise ArchitectureError(
            f"ONNX export supports {', '.join(sorted(supporting('onnx')))}, not '{cfg.model_type}'"
        )
    anatomy = analyze(model)
    nh, hidden = cfg.num_attention_heads, cfg.hidden_size
    kv = getattr(cfg, "num_key_value_heads", nh)
    d = getattr(cfg, "head_dim", None) or hidden // nh
    g, rep = Graph(), ExportReport()
    emb = model.get_input_embeddings().weight.detach().float().numpy()
    x = g.op("Gather", [g.const("embed", emb), "input_ids"])  # [B, S, H]
    pos, mask = _positions(g)
    cos_t, sin_t = _rope_tables(cfg, d)
    cos = g.op("Unsqueeze", [g.op("Gather", [g.const("cos", cos_t), pos]), g.ints(0, 1)])
    sin = g.op("Unsqueeze", [g.op("Gather", [g.const("sin", sin_t), pos]), g.ints(0, 1)])
    dims = Dims(nh, kv, d, cfg.rms_norm_eps)
    presents_k, presents_v = [], []
    for i, block in enumerate(anatomy.blocks):
        layer = Layer(g, block, fam.roles, f"{anatomy.blocks_path}.{i}", bits, rep, strict)
        x, k, v = _block(layer, x, i, dims, cos, sin, mask)
        presents_k.append(g.op("Unsqueeze", [k, g.ints(0)]))
        presents_v.append(g.op("Unsqueeze", [v, g.ints(0)]))
    final_norm = [m for n, m in anatomy.norms.items() if not n.startswith(anatomy.blocks_path)]
    x = _rms_norm(g, x, final_norm[0].weight, cfg.rms_norm_eps)
    head = model.get_output_embeddings()
    head_w = emb if head.weight is model.get_input_embeddings().weight else None
    if head_w is None:
        head_w = head.weight.detach().float().numpy()
    g.nodes.append(helper.make_node("MatMul", [x, g.const("head_t", head_w.T)], ["logits"]))
    g.nodes.append(helper.make_node("Concat", presents_k, ["present_keys"], axis=0))
    g.nodes.append(helper.make_node("Concat", presents_v, ["present_values"], axis=0))
    n_layers = len(anatomy.blocks)

    def cache(n: str, p: str):
        return helper.make_tensor_value_info(n, TensorProto.FLOAT, [n_layers, "batch", kv, p, d])

    logits_shape = ["batch", "seq", cfg.vocab_size]
    graph = helper.make_graph(
        g.nodes,
        "tinyllm_decoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            cache("past_keys", "past"),
            cache("past_values", "past"),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits_shape),
            cache("present_keys", "total"),
            cache("present_values", "total"),
        ],
        g.inits,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="tinyllm"), rep


def export_onnx(
    model: nn.Module, path: Path, qtype: str = "fp32", strict: bool = False, **_: Any
) -> ExportReport:
    """Write `model` as an ONNX graph file plus its weights in `<name>.data` beside it; the
    weights land first and the graph last, so a complete-looking graph always has its data."""
    if qtype not in TYPES:
        raise ConfigError(f"unknown ONNX type '{qtype}'; choose one of {', '.join(TYPES)}")
    bits = TYPES[qtype]
    if bits == "w8a8" and not any(isinstance(m, ActQuantLinear) for m in model.modules()):
        raise ConfigError(
            "--type w8a8 writes INT8 weight-and-activation layers, and this model has none; "
            "quantize it first (tinyllm quantize --method smoothquant | int8-static | "
            "int8-dynamic)"
        )
    if bits and bits != "w8a8" and not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ConfigError(
            f"--type {qtype} writes quantized layers as MatMulNBits, and this model has none; "
            f"quantize it first (tinyllm quantize --bits {bits} --group-size 32)"
        )
    proto, rep = build_graph(model, bits, strict)
    path = Path(path)
    data = path.with_name(path.name + ".data")
    with atomic_dir(path.with_name(path.name + ".parts")) as tmp:
        onnx.save_model(
            proto,
            str(tmp / path.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        os.replace(tmp / data.name, data)  # weights first, then the graph that points at them
        os.replace(tmp / path.name, path)
    shutil.rmtree(path.with_name(path.name + ".parts"), ignore_errors=True)
    if rep.float_layers:
        log.warning(
            "%d quantized layers written as float MatMul: %s",
            len(rep.float_layers),
            sorted(set(rep.float_layers.values())),
        )
    return rep
