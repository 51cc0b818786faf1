"""GGUF export for llama.cpp, written with the `gguf` package (llama.cpp's own Python library).

Metadata (architecture, hyper-parameters), the full tokenizer and every tensor under llama.cpp's
names, from small per-family tables. Quantized layers whose grid a GGUF block type represents are
carried bit for bit (tinyllm.export.gguf_blocks); anything else is re-quantized from its float
values with llama.cpp's reference quantizer (gguf.quants), with a warning that says what was lost
(or refused under `strict`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, LlamaFileType, TokenType
from gguf import quants as gq
from torch import nn

from tinyllm.core.stream import BlockReader
from tinyllm.errors import ArchitectureError, ConfigError
from tinyllm.export.gguf_blocks import (
    K_FALLBACK,
    K_TYPES,
    carry,
    carry_iq4nl,
    carry_iq4xs,
    carry_k,
    permute_rows,
    quantize_iq4nl,
    quantize_iq4xs,
    quantize_k,
    why_not_carried,
    why_not_iq4nl,
    why_not_iq4xs,
    why_not_k,
)
from tinyllm.kernels.qlinear import QuantEmbedding, QuantLinear
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.models.anatomy import analyze, is_norm
from tinyllm.models.families import FAMILIES, Family, supporting
from tinyllm.quant.embed import tied_head
from tinyllm.util.fs import atomic_path
from tinyllm.util.progress import track

log = logging.getLogger(__name__)

TYPES: dict[str, T] = {
    "f32": T.F32,
    "f16": T.F16,
    "bf16": T.BF16,
    "q8_0": T.Q8_0,
    "q4_0": T.Q4_0,
    "q4_1": T.Q4_1,
    "q5_0": T.Q5_0,
    "q5_1": T.Q5_1,
    "q2_k": T.Q2_K,
    "q3_k": T.Q3_K,
    "q4_k": T.Q4_K,
    "q5_k": T.Q5_K,
    "q6_k": T.Q6_K,
    "iq4_nl": T.IQ4_NL,
    "iq4_xs": T.IQ4_XS,
}
FILE_TYPES = {
    T.F32: LlamaFileType.ALL_F32,
    T.F16: LlamaFileType.MOSTLY_F16,
    T.BF16: LlamaFileType.MOSTLY_BF16,
    T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    T.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    T.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    T.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    T.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    T.Q2_K: LlamaFileType.MOSTLY_Q2_K,
    T.Q3_K: LlamaFileType.MOSTLY_Q3_K_S,
    T.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
    T.Q5_K: LlamaFileType.MOSTLY_Q5_K_S,
    T.Q6_K: LlamaFileType.MOSTLY_Q6_K,
    T.IQ4_NL: LlamaFileType.MOSTLY_IQ4_NL,
    T.IQ4_XS: LlamaFileType.MOSTLY_IQ4_XS,
}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
CARRY_ORDER = (T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1)  # for a quantized embedding table

# Hugging Face pre-tokenizer settings -> llama.cpp pre-tokenizer name (the regex it applies)
PRE_TOKENIZERS = {
    '{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}': (
        "gpt-2"
    ),
}


def gguf_family(model: nn.Module) -> Family:
    """The model's family (models/families.py), refused if llama.cpp cannot run it."""
    model_type = model.config.model_type
    fam = FAMILIES.get(model_type)
    if fam is None or fam.gguf is None:
        raise ArchitectureError(
            f"GGUF export does not support model type '{model_type}'; supported: "
            f"{', '.join(sorted(supporting('gguf')))}"
        )
    problems = fam.gguf.limits(model.config) if fam.gguf.limits else []
    if problems:
        raise ArchitectureError(
            f"llama.cpp's {fam.gguf.arch} graph cannot run this {model_type} config: "
            + "; ".join(problems)
        )
    return fam


def _rope_params(cfg: Any) -> dict:
    params = getattr(cfg, "rope_parameters", None) or {}
    if getattr(cfg, "rope_theta", None) is None and "full_attention" in params:
        params = params["full_attention"]  # per layer type (Gemma 3)
    return params


def _rope_theta(cfg: Any, fam: Family) -> float:
    theta, params = getattr(cfg, "rope_theta", None), _rope_params(cfg)
    kind = params.get("rope_type", "default")
    if fam.gguf.rope_types and kind not in fam.gguf.rope_types:
        raise ArchitectureError(f"rope scaling '{kind}' is not supported by the GGUF writer yet")
    return float(theta if theta is not None else params.get("rope_theta", 10000.0))


def rope_freqs(cfg: Any, theta: float, head_dim: int) -> np.ndarray | None:
    """Llama 3's RoPE scaling (Llama-3.1/3.2) as llama.cpp reads it, the tensor
    `rope_freqs.weight`: per rotary frequency the factor it is divided by, 1 for wavelengths
    shorter than original_context / high_freq_factor, `factor` for those longer than
    original_context / low_freq_factor, interpolated between. None for other RoPE kinds."""
    p = _rope_params(cfg)
    if p.get("rope_type") != "llama3":
        return None
    freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen, old = 2 * np.pi / freq, p["original_max_position_embeddings"]
    lo, hi, factor = p["low_freq_factor"], p["high_freq_factor"], p["factor"]
    smooth = (old / wavelen - lo) / (hi - lo)
    between = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, between))
    return out.astype(np.float32)


def _hparams(w: GGUFWriter, cfg: Any, fam: Family) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta = _rope_theta(cfg, fam)
    w.add_rope_freq_base(theta)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    for key, attr in fam.gguf.extra.items():
        value = getattr(cfg, attr, None)
        if value is not None:
            w.add_uint32(f"{fam.gguf.arch}.{key}", int(value))
    factors = rope_freqs(cfg, theta, head_dim)
    if factors is not None:  # a model-level tensor, first as llama.cpp's converter writes it
        w.add_tensor("rope_freqs.weight", factors)


def _adds_bos(tok: Any) -> bool:
    ids = tok("a")["input_ids"]
    return tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id


def _vocab(tok: Any, data: dict, size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their llama.cpp types."""
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(TokenType.UNUSED)] * size
    for text, i in data["model"]["vocab"].items():
        if i < size:
            tokens[i], types[i] = text, int(TokenType.NORMAL)
    for added in data.get("added_tokens", []):
        i = added["id"]
        if i < size:
            tokens[i] = added["content"]
            types[i] = int(TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED)
    if data["model"].get("byte_fallback"):
        for i, text in enumerate(tokens):
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = int(TokenType.BYTE)
    if tok.unk_token_id is not None and tok.unk_token_id < size:
        types[tok.unk_token_id] = int(TokenType.UNKNOWN)
    return tokens, types


def _merges(data: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]


def _spm_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Scores for llama.cpp's SentencePiece tokenizer, which merges the pair whose result scores
    highest: a merged token scores minus the rank of the first merge that forms it."""
    scores = [0.0] * len(tokens)
    index = {t: i for i, t in enumerate(tokens)}
    seen: set[int] = set()
    for rank, merge in enumerate(merges):
        i = index.get(merge.replace(" ", "", 1))
        if i is not None and i not in seen:
            scores[i] = -float(rank)
            seen.add(i)
    return scores


def _tokenizer(w: GGUFWriter, tok: Any, cfg: Any) -> None:
    data = json.loads(tok.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ArchitectureError(f"GGUF export supports BPE tokenizers, not {data['model']['type']}")
    tokens, types = _vocab(tok, data, cfg.vocab_size)
    merges = _merges(data)
    if data["model"].get("byte_fallback"):  # SentencePiece-style BPE (Llama 2, Gemma)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores(_spm_scores(tokens, merges))
        w.add_add_space_prefix(False)
    else:
        pre = json.dumps(data.get("pre_tokenizer"))
        name = PRE_TOKENIZERS.get(pre)
        if name is None:
            log.warning("unknown pre-tokenizer %s: llama.cpp will split text its default way", pre)
            name = "default"
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(name)
        w.add_token_merges(merges)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for setter, value in (
        (w.add_bos_token_id, tok.bos_token_id),
        (w.add_eos_token_id, tok.eos_token_id),
        (w.add_unk_token_id, tok.unk_token_id),
        (w.add_pad_token_id, tok.pad_token_id),
    ):
        if value is not None:
            setter(int(value))
    w.add_add_bos_token(_adds_bos(tok))
    w.add_add_eos_token(False)
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)


# tensor data written so far stays in memory up to this size, then goes to a temporary file
SPOOL_BYTES = 256 << 20


@dataclass
class Tensor:
    """One tensor to write: float values or a quantized record, and its GGUF name."""

    name: str
    value: torch.Tensor | None = None
    record: QuantizedWeight | None = None
    permute_heads: int = 0  # > 0: rows are Q/K heads to put in GGUF's rotary order


def collect_tensors(
    model: nn.Module, fam: Family, reader: BlockReader | None = None
) -> Iterator[Tensor]:
    """Every tensor of the model under its GGUF name, in module order; an unmapped tensor is an
    error. With a `reader` the blocks are read one at a time as they come (`_named_modules`)."""
    anatomy = analyze(model)
    cfg = model.config
    heads = {
        "attn_q": cfg.num_attention_heads,
        "attn_k": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
    }
    module_names = {id(m): n for n, m in model.named_modules()}
    top = {}
    if anatomy.embedding is not None:
        top[module_names[id(anatomy.embedding)]] = "token_embd"
    head = model.get_output_embeddings()
    tied = tied_head(model)
    if head is not None and not tied:
        top[module_names[id(head)]] = "output"
    done: set[str] = set()
    for mod_name, mod in _named_modules(model, anatomy.blocks_path, reader):
        gguf_name = top.get(mod_name) or _block_name(mod_name, anatomy.blocks_path, fam)
        if gguf_name is None and _is_final_norm(mod_name, mod, anatomy.blocks_path):
            gguf_name = "output_norm"
        if gguf_name is None:
            continue
        perm = 0
        if fam.gguf.permute_qk:
            perm = heads.get(gguf_name.rsplit(".", 1)[-1], 0)
        if isinstance(mod, QuantLinear | QuantEmbedding):
            yield Tensor(f"{gguf_name}.weight", record=mod.qweight, permute_heads=perm)
            done.add(f"{mod_name}.weight")
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}"
            if full in done:
                continue
            value = p.detach()  # as held: a narrow table is widened chunk by chunk
            if "norm" in gguf_name and pname == "weight":
                value = value.float() + fam.norm_offset
            yield Tensor(f"{gguf_name}.{pname}", value=value, permute_heads=perm)
            done.add(full)
    _check_all_mapped(model, done, tied)


def _named_modules(
    model: nn.Module, blocks_path: str, reader: BlockReader | None
) -> Iterator[tuple[str, nn.Module]]:
    """model.named_modules(), in its order; with a `reader`, each block is read just before its
    modules are visited and given back after (a streamed export holds one block)."""
    if reader is None:
        yield from model.named_modules()
        return
    for name, mod in model.named_modules():
        if name.startswith(blocks_path + "."):
            continue
        yield name, mod
        if name == blocks_path:
            for i in range(len(mod)):
                yield from reader.enter(i).named_modules(prefix=f"{blocks_path}.{i}")
                reader.leave(i)


def _block_name(mod_name: str, blocks_path: str, fam: Family) -> str | None:
    prefix = blocks_path + "."
    if not mod_name.startswith(prefix):
        return None
    bid, _, local = mod_name[len(prefix) :].partition(".")
    name = fam.gguf_block_names().get(local)
    return name.format(bid=bid) if name else None


def gguf_layout(model: nn.Module, path: Path) -> dict[str, str]:
    """Block linear name -> the GGUF type (lower case) its tensor holds in the GGUF file at
    `path`: an existing file's per-tensor layout, for quantizing onto the same types (`tinyllm
    quantize --method mixed --layout-from FILE`). `model` may be a meta-device skeleton."""
    from gguf import GGUFReader

    from tinyllm.quant.common import GGUF_GRID_TYPES

    try:
        types = {t.name: t.tensor_type.name.lower() for t in GGUFReader(str(path)).tensors}
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path} is not a GGUF file tinyllm can read: {exc}") from None
    fam, anatomy = gguf_family(model), analyze(model)
    out = {}
    for s in anatomy.linears:
        name = f"{_block_name(s.name, anatomy.blocks_path, fam)}.weight"
        if name not in types:
            raise ConfigError(f"{path} has no tensor {name} for {s.name}: a file of another model?")
        if types[name] not in GGUF_GRID_TYPES:
            raise ConfigError(
                f"{path}: {name} is {types[name].upper()}, not a type tinyllm quantizes onto "
                f"({', '.join(GGUF_GRID_TYPES)})"
            )
        out[s.name] = types[name]
    return out


def _is_final_norm(mod_name: str, mod: nn.Module, blocks_path: str) -> bool:
    return is_norm(mod) and not mod_name.startswith(blocks_path + ".")


def _check_all_mapped(model: nn.Module, done: set[str], tied: bool) -> None:
    missing = [n for n, _ in model.named_parameters() if n not in done]
    if tied:
        head = model.get_output_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        missing = [n for n in missing if n != f"{names[id(head)]}.weight"]
    if missing:
        raise ArchitectureError(
            f"GGUF export has no llama.cpp name for {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )


@dataclass
class ExportReport:
    carried: list[str] = field(default_factory=list)
    requantized: dict[str, str] = field(default_factory=dict)  # name -> why
    types: dict[str, str] = field(default_factory=dict)


# a float tensor is converted CHUNK_ELEMENTS at a time (row-wise: every type quantizes rows
# on their own), so a 128k-vocabulary table never has a float32 copy and its temporaries
CHUNK_ELEMENTS = 1 << 24


def _float_data(value: torch.Tensor, qtype: T) -> tuple[np.ndarray, T]:
    """Float values in qtype (gguf.quants for the block types). 1-D tensors stay F32."""
    if value.ndim == 2 and value.shape[0] > 1 and value.numel() > CHUNK_ELEMENTS:
        step = max(1, CHUNK_ELEMENTS // value.shape[1])
        parts = [_float_data(value[i : i + step], qtype) for i in range(0, len(value), step)]
        return np.concatenate([data for data, _ in parts]), parts[0][1]
    arr = value.float().numpy()
    if arr.ndim < 2 or qtype == T.F32:
        return arr.astype(np.float32), T.F32
    if qtype == T.F16:
        return arr.astype(np.float16), T.F16
    if arr.shape[-1] % gq.GGML_QUANT_SIZES[qtype][0]:
        return arr.astype(np.float16), T.F16  # rows not a whole number of blocks
    if qtype in K_TYPES:
        return quantize_k(value, qtype), qtype
    if qtype == T.IQ4_NL:
        return quantize_iq4nl(value), qtype
    if qtype == T.IQ4_XS:
        return quantize_iq4xs(value), qtype
    return gq.quantize(arr, qtype), qtype


def _why_not(record: QuantizedWeight, qtype: T) -> str | None:
    if qtype == T.IQ4_NL:
        return why_not_iq4nl(record)
    if qtype == T.IQ4_XS:
        return why_not_iq4xs(record)
    return why_not_k(record, qtype) if qtype in K_TYPES else why_not_carried(record, qtype)


def _carry(record: QuantizedWeight, qtype: T) -> np.ndarray:
    if qtype == T.IQ4_NL:
        return carry_iq4nl(record)
    if qtype == T.IQ4_XS:
        return carry_iq4xs(record)
    return carry_k(record, qtype) if qtype in K_TYPES else carry(record, qtype)


def own_type(t: Tensor) -> T:
    """`--type auto`: the GGUF type a layer's own grid carries into (its K type or IQ4_NL, else
    the first of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 that holds it exactly); F16 for float layers, Q8_0
    for a grid no type holds (re-quantized, or refused under --strict)."""
    if t.record is None:
        return T.F16
    if t.record.kquant is not None:
        return next(q for q, name in K_TYPES.items() if name == t.record.kquant)
    if why_not_iq4xs(t.record) is None:
        return T.IQ4_XS  # the smaller of the two types the record fits
    if why_not_iq4nl(t.record) is None:
        return T.IQ4_NL
    order = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
    return next((q for q in order if why_not_carried(t.record, q) is None), T.Q8_0)


def tensor_type(t: Tensor, qtype: T) -> T:
    """qtype, or for a K type the type llama.cpp falls back to when rows are not whole
    super-blocks (K_FALLBACK)."""
    cols = t.record.shape[1] if t.record is not None else t.value.shape[-1]
    if qtype in K_FALLBACK and cols % gq.GGML_QUANT_SIZES[qtype][0]:
        return K_FALLBACK[qtype]
    return qtype


def tensor_data(t: Tensor, qtype: T, report: ExportReport, strict: bool) -> tuple[np.ndarray, T]:
    """What to store for one tensor under the requested type."""
    qtype = tensor_type(t, qtype)
    if t.record is None:
        data, kind = _float_data(t.value, qtype)
    elif qtype in FLOAT_TYPES:
        data, kind = _float_data(t.record.dequantize(), qtype)
    else:
        reason = _why_not(t.record, qtype)
        if reason is None:
            data, kind = _carry(t.record, qtype), qtype
            report.carried.append(t.name)
        else:
            if strict:
                raise ConfigError(
                    f"{t.name}: cannot store as {qtype.name} without re-quantizing ({reason}); "
                    "drop --strict to re-quantize, or quantize with --gguf-compatible "
                    f"{qtype.name.lower()}"
                )
            report.requantized[t.name] = reason
            data, kind = _float_data(t.record.dequantize(), qtype)
    if t.permute_heads:
        data = permute_rows(data, t.permute_heads)
    report.types[t.name] = kind.name
    return np.ascontiguousarray(data), kind


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: Path,
    qtype: str = "f16",
    embed_type: str | None = None,
    strict: bool = False,
    name: str = "tinyllm export",
    reader: BlockReader | None = None,
) -> ExportReport:
    """Write `model` as a GGUF file llama.cpp loads; returns what was carried or re-quantized.
    With a `reader` (core.stream.BlockReader: `model` is its skeleton) the blocks are read one
    at a time; either way each tensor's data goes to a temporary file beside the output as soon
    as it is made (SPOOL_BYTES in memory first), so memory holds the model and one tensor."""
    if qtype not in TYPES and qtype != "auto":
        raise ConfigError(f"unknown GGUF type '{qtype}'; choose one of {', '.join(TYPES)}, auto")
    if embed_type is not None and embed_type not in TYPES:
        raise ConfigError(f"unknown --embed-type '{embed_type}'; choose one of {', '.join(TYPES)}")
    fam = gguf_family(model)
    main = TYPES.get(qtype, T.Q8_0)  # auto: each layer in its record's type (own_type)
    embed = TYPES[embed_type] if embed_type else (main if main in FLOAT_TYPES else T.Q8_0)
    tensors = collect_tensors(model, fam, reader)
    record = getattr(model.get_input_embeddings(), "qweight", None)
    if embed_type is None and record is not None:  # quantized embeddings: carry them if possible
        embed = next((q for q in CARRY_ORDER if why_not_carried(record, q) is None), embed)
    report = ExportReport()
    with (
        atomic_path(Path(path)) as tmp,
        tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, dir=Path(path).parent) as spool,
    ):
        w = GGUFWriter(str(tmp), fam.gguf.arch, use_temp_file=True)
        w.temp_file = spool
        w.add_name(name)
        w.add_file_type(int(LlamaFileType.GUESSED if qtype == "auto" else FILE_TYPES[main]))
        w.add_quantization_version(2)
        _hparams(w, model.config, fam)
        _tokenizer(w, tokenizer, model.config)
        for t in track(tensors, description=f"GGUF {qtype}"):
            table = t.name.startswith(("token_embd.", "output."))
            kind = embed if table else main
            if qtype == "auto" and not table:  # the embedding/head follow --embed-type
                kind = own_type(t)
            data, stored = tensor_data(t, kind, report, strict)
            w.add_tensor(t.name, data, raw_dtype=stored)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    if report.requantized:
        log.warning(
            "%d of %d quantized layers re-quantized to %s from their dequantized weights "
            "(a second rounding on top of tinyllm's): %s",
            len(report.requantized),
            len(report.requantized) + len(report.carried),
            main.name,
            sorted(set(report.requantized.values())),
        )
    return report
