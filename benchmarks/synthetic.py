"""Synthetic models of real shapes: seeded random bf16 weights in a Hugging Face directory.

Run: .venv/bin/python benchmarks/synthetic.py NAME --out DIR [--layers N] [--seed S]
     .venv/bin/python benchmarks/synthetic.py --list

NAME is one of SYNTHETIC (the published config.json of SmolLM2-360M, Llama-3.2-1B, Qwen2.5-1.5B
and Llama-3.1-8B). The directory holds that config (num_hidden_layers replaced by --layers),
sharded safetensors (`model-0000i-of-0000N.safetensors`, about --shard-gb each, plus
`model.safetensors.index.json`) and a tokenizer, and loads with `tinyllm.load(DIR)` and
`transformers.AutoModelForCausalLM.from_pretrained(DIR)`.

Weights: every tensor comes from its own generator seeded by (seed, tensor name), so a tensor's
bytes do not depend on the order of writing or on the other tensors: normal(0, 0.02) for
matrices (o_proj and down_proj scaled by 1/sqrt(2 * layers), as GPT-2 initializes residual
projections), ones for norm weights, zeros for biases; a tied lm_head is not stored. Names and
shapes come from the model built on the meta device; nothing is materialized: each tensor is
drawn in row chunks of at most CHUNK_ELEMENTS values and written straight into the safetensors
file, so peak memory is one chunk (tens of MB), not a shard, let alone the model. The directory
is written atomically (a temporary directory renamed into place).

Tokenizer: the default model's (SmolLM2, 49,152 ids), its BPE vocabulary padded with
`<|synthetic_ID|>` entries up to the config's vocab_size. The padded ids have no merges, so
encoding text never produces them, but every id a random model samples decodes to text (without
the padding the tokenizer would silently decode such ids to nothing); the padding costs ~0.2 s
to write and loads in ~0.4 s at 128k ids. Quality on random weights means nothing; time, memory
and correctness do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_LLAMA_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

# The published config.json of each model (Hugging Face Hub: HuggingFaceTB/SmolLM2-360M,
# meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-1.5B, meta-llama/Llama-3.1-8B).
SYNTHETIC: dict[str, dict[str, Any]] = {
    "smollm2-360m": {
        **_LLAMA_COMMON,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "head_dim": 64,
        "hidden_size": 960,
        "intermediate_size": 2560,
        "is_llama_config": True,
        "max_position_embeddings": 8192,
        "num_attention_heads": 15,
        "num_hidden_layers": 32,
        "num_key_value_heads": 5,
        "rope_interleaved": False,
        "rope_scaling": None,
        "rope_theta": 100000,
        "tie_word_embeddings": True,
        "vocab_size": 49152,
    },
    "llama-3.2-1b": {
        **_LLAMA_COMMON,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": 64,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "rope_scaling": {"factor": 32.0, **_LLAMA3_ROPE},
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "vocab_size": 128256,
    },
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 1536,
        "initializer_range": 0.02,
        "intermediate_size": 8960,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "llama-3.1-8b": {
        **_LLAMA_COMMON,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rope_scaling": {"factor": 8.0, **_LLAMA3_ROPE},
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "vocab_size": 128256,
    },
}
CHUNK_ELEMENTS = 1 << 24  # values drawn at once: 64 MB of float32, 32 MB of bf16
SHARD_BYTES = 2 * 10**9  # Hugging Face's usual shard size
STD = 0.02
INDEX_FILE = "model.safetensors.index.json"
PAD_TOKEN = "<|synthetic_{}|>"


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: its name, shape, how it is initialized and its standard deviation."""

    name: str
    shape: tuple[int, ...]
    init: str  # "normal", "ones" or "zeros"
    std: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return 2 * self.numel  # bfloat16


@dataclass(frozen=True)
class Summary:
    """What `write_model` wrote."""

    name: str
    path: Path
    params: int
    bytes: int
    shards: int
    seconds: float
    tokenizer_size: int


def model_config(name: str, layers: int | None = None) -> dict[str, Any]:
    """The published config of `name`, with `layers` decoder blocks if given."""
    if name not in SYNTHETIC:
        raise SystemExit(f"unknown synthetic model '{name}'; choose from {', '.join(SYNTHETIC)}")
    config = json.loads(json.dumps(SYNTHETIC[name]))  # a deep copy
    if layers is not None:
        if layers < 1:
            raise SystemExit(f"--layers must be at least 1, got {layers}")
        config["num_hidden_layers"] = layers
        if "max_window_layers" in config:
            config["max_window_layers"] = layers
    return config


def init_of(name: str, shape: tuple[int, ...], layers: int) -> tuple[str, float]:
    """(init, std) of a tensor: ones for norms, zeros for biases, normal for the rest."""
    if name.endswith(".bias"):
        return "zeros", 0.0
    if len(shape) == 1:
        return "ones", 0.0  # every 1-D weight of these families is a norm's
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return "normal", STD / math.sqrt(2 * layers)
    return "normal", STD


def tensor_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """The tensors a checkpoint of `config` stores, from the model built on the meta device;
    a tensor shared with an earlier one (the tied lm_head) is left out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tied = bool(config.get("tie_word_embeddings"))
    specs, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen or (tied and name == "lm_head.weight"):
            continue
        seen.add(id(t))
        init, std = init_of(name, tuple(t.shape), config["num_hidden_layers"])
        specs.append(TensorSpec(name, tuple(t.shape), init, std))
    return specs


def plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors grouped in order into shards of at most `shard_bytes` (a bigger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, tensor name)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tensor_chunks(spec: TensorSpec, seed: int) -> Iterator[torch.Tensor]:
    """The tensor's values in row order as bf16 chunks of at most CHUNK_ELEMENTS values."""
    if spec.init != "normal":
        fill = 1.0 if spec.init == "ones" else 0.0
        for start in range(0, spec.numel, CHUNK_ELEMENTS):
            yield torch.full((min(CHUNK_ELEMENTS, spec.numel - start),), fill, dtype=torch.bfloat16)
        return
    gen = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    row = math.prod(spec.shape[1:])
    rows_per_chunk = max(1, CHUNK_ELEMENTS // row)
    for start in range(0, spec.shape[0], rows_per_chunk):
        n = min(rows_per_chunk, spec.shape[0] - start) * row
        chunk = torch.randn(n, generator=gen, dtype=torch.float32)  # [n]
        yield chunk.mul_(spec.std).to(torch.bfloat16)


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The 8-byte length and the JSON header (padded to 8 bytes) of a bf16 safetensors file."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": "BF16",
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_safetensors(
    path: Path,
    specs: list[TensorSpec],
    chunks: Callable[[TensorSpec], Iterator[torch.Tensor]],
    on_bytes: Callable[[int], None] = lambda n: None,
) -> int:
    """Write `specs` into one safetensors file, each tensor streamed from `chunks(spec)`; only
    one chunk is alive at a time. -> bytes of tensor data written."""
    total = 0
    with open(path, "wb") as f:
        f.write(safetensors_header(specs))
        for spec in specs:
            written = 0
            for chunk in chunks(spec):
                data = chunk.contiguous().view(torch.uint8).numpy()
                f.write(data)
                written += data.nbytes
                on_bytes(data.nbytes)
                del chunk, data
            if written != spec.nbytes:
                raise RuntimeError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes}")
            total += written
    return total


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_weights(
    directory: Path,
    specs: list[TensorSpec],
    seed: int,
    shard_bytes: int,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> int:
    """All shards plus the index into `directory`. -> total bytes of tensor data."""
    shards = plan_shards(specs, shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = shard_name(i, len(shards))
        total += write_safetensors(
            directory / name, shard, lambda s: tensor_chunks(s, seed), on_bytes
        )
        weight_map.update({spec.name: name for spec in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return total


def source_tokenizer(source: str | None) -> Any:
    """The tokenizer of a Hugging Face directory, or (None) of tinyllm's default model."""
    from transformers import AutoTokenizer

    if source is not None:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    from tinyllm.models import registry
    from tinyllm.models.load import DEFAULT_MODEL

    gguf = registry.gguf_path(registry.REGISTRY[DEFAULT_MODEL])
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def pad_tokenizer(path: Path, vocab_size: int) -> int:
    """Pad tokenizer.json's BPE vocabulary with PAD_TOKEN entries up to `vocab_size` ids.
    -> the tokenizer's size afterwards."""
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    ids = [*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))]
    size = max(ids) + 1
    if size > vocab_size:
        raise SystemExit(f"the tokenizer has {size} ids, more than the model's {vocab_size}")
    for i in range(size, vocab_size):
        vocab[PAD_TOKEN.format(i)] = i
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return max(size, vocab_size)


def write_tokenizer(directory: Path, vocab_size: int, source: str | None) -> int:
    """Save the tokenizer into `directory`, padded to `vocab_size`. -> its size."""
    source_tokenizer(source).save_pretrained(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise SystemExit("the tokenizer has no tokenizer.json (a fast tokenizer is needed)")
    return pad_tokenizer(path, vocab_size)


def write_model(
    name: str,
    out: Path,
    seed: int = 0,
    layers: int | None = None,
    shard_bytes: int = SHARD_BYTES,
    tokenizer: str | None = None,
    progress: bool = True,
) -> Summary:
    """Write synthetic model `name` into `out` (atomically). -> what was written."""
    from tinyllm.util.fs import atomic_dir
    from tinyllm.util.progress import make_progress

    t0 = time.perf_counter()
    config = model_config(name, layers)
    specs = tensor_specs(config)
    total_mb = sum(s.nbytes for s in specs) / 2**20
    with atomic_dir(out) as tmp, make_progress() as bar:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok_size = write_tokenizer(tmp, config["vocab_size"], tokenizer)
        task = bar.add_task(f"{name} weights (MiB)", total=round(total_mb), info="")
        bar.update(task, visible=progress)
        nbytes = write_weights(
            tmp, specs, seed, shard_bytes, lambda n: bar.advance(task, n / 2**20)
        )
        shards = len(plan_shards(specs, shard_bytes))
    params = sum(s.numel for s in specs)
    seconds = time.perf_counter() - t0
    return Summary(name, out, params, nbytes, shards, seconds, tok_size)


def _list() -> None:
    for name in SYNTHETIC:
        cfg = SYNTHETIC[name]
        params = sum(s.numel for s in tensor_specs(model_config(name)))
        print(
            f"{name:14s} {cfg['model_type']:6s} hidden {cfg['hidden_size']:5d} "
            f"blocks {cfg['num_hidden_layers']:3d} ffn {cfg['intermediate_size']:6d} "
            f"vocab {cfg['vocab_size']:7d} tied {cfg['tie_word_embeddings']!s:5s} "
            f"params {params / 1e9:.3f} B ({2 * params / 1e9:.2f} GB bf16)"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", choices=list(SYNTHETIC))
    p.add_argument("--out", type=Path, help="output directory (default: /work/synth/NAME)")
    p.add_argument("--layers", type=int, help="decoder blocks (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1e9, help="GB per shard")
    p.add_argument("--tokenizer", help="HF directory whose tokenizer to use (default: SmolLM2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.add_argument("--list", action="store_true", help="list the models and exit")
    args = p.parse_args(argv)
    if args.list or args.name is None:
        _list()
        return
    out = args.out or Path("/work/synth") / args.name
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it")
    s = write_model(
        args.name, out, args.seed, args.layers, int(args.shard_gb * 1e9), args.tokenizer
    )
    from tinyllm.util.memory import peak_rss_bytes

    print(
        f"{s.name}: {s.params:,} parameters, {s.bytes / 1e9:.2f} GB in {s.shards} shard(s), "
        f"tokenizer {s.tokenizer_size:,} ids, {s.seconds:.1f} s, "
        f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB -> {s.path}"
    )


if __name__ == "__main__":
    sys.exit(main())
