"""Predict the peak memory and run time of a job from a model's config.json alone.

No weight is read: the shapes come from the model built on the meta device (one decoder block,
multiplied by the number of blocks), the stored dtype from the config. Memory is a sum of named
parts; time is FLOPs over the host's measured float32 matmul rate (a short micro-benchmark, cached
in `$TINYLLM_CACHE/host/profile.json`) plus bytes over its memory bandwidth. Every constant is
data (COSTS, METHODS) and every estimate lists what it assumed.

Jobs:
- compress: the streaming path (one decoder block at a time on the compute device):
  baseline + input embeddings in their stored dtype (held through a pass) + one block's work
  (the block in float32, twice while its forward runs: oneDNN keeps a packed copy; the
  method's workspace, GPTQ/SparseGPT: 3 float32 in x in matrices of the widest linear plus its
  weight; one batch's transients; the freed small buffers the C allocator keeps) +
  calibration activations (hidden states in float32, two streams, three with float
  targets; down_proj inputs in float16 where a method keeps them).
- eval: weights at their stored (or packed) size + one batch's activations and logits.
- generate: weights + the KV cache; per-token time is the weight bytes over memory bandwidth.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinyllm.core import registry
from tinyllm.errors import ConfigError, ModelLoadError
from tinyllm.util.units import human_bytes

log = logging.getLogger(__name__)

JOBS = ("compress", "eval", "generate")
MiB = 2**20
GiB = 2**30

# Constants of the model, measured on this project's hosts (docs/sizing.md says how).
COSTS: dict[str, float] = {
    # python, torch, transformers, tinyllm, the tokenizer and the calibration corpus: the peak
    # RSS of `quantize --stream on` and of `generate` on a one-block 64-wide model
    "baseline_bytes": 430 * MiB,
    "forward_pack_factor": 2.0,  # block weights alive during its forward (float32 + oneDNN copy)
    "hessian_copies": 2.0,  # float32 in x in matrices during the solve: H and its factor
    "transient_ffn_copies": 3.0,  # float32 batch x seq x ffn tensors alive inside the MLP
    "attention_scores": 1.0,  # float32 batch x heads x seq x seq attention scores
    "mmap_threshold_bytes": 32 * MiB,  # glibc: bigger buffers are mapped and returned on free
    "retained_share": 0.5,  # fitted on streaming GPTQ, synthetic smollm2-360m and 1B (2 blocks)
    "calib_batch": 8,  # calibration windows per forward (core.steps.Context.batch_size)
    "eval_batch_tokens": 2048,  # tokens per evaluation forward
    "eval_windows": 40,  # `tinyllm eval` default windows x 512 tokens
    "eval_seq_len": 512,
    "kv_cache_bytes": 64 * MiB,  # `tinyllm generate --kv-memory` default
    "loaded_float_bytes": 4,  # a Hugging Face model as tinyllm.load holds it (float32)
    "load_transient_share": 0.6,  # of the stored bytes: file pages resident while loading
    "checkpoint_float_bytes": 2,  # unquantized tensors of a tinyllm checkpoint (float16)
    "lean_share": 0.5,  # lean loading keeps tables narrow above this share of available memory
    # Rates as fractions of the micro-benchmark's (a 4096 x 576 -> 1536 float32 linear), from
    # benchmarks/results/gptq_floor.json (smollm2-135m block 0, 128 x 512 tokens: forward 3.2 s,
    # Hessians 1.5-1.8 s, GPTQ 0.36-0.43 s) against that linear's ~206 GFLOPS on the idle host
    "matmul_efficiency": 0.75,  # block forwards (linears, attention, norms, hooks)
    "hessian_efficiency": 0.65,  # X^T X, upper triangle only: tokens x in^2 FLOPs per input
    # GPTQ/SparseGPT solves: Cholesky and blocked updates at this fraction of the rate, plus a
    # per-column cost (quantizing one column, its error and updates: Python-bound for narrow
    # layers) in FLOP-equivalents; 135M's block 0 (3,840 columns in 5 stacks) took 0.36-0.43 s
    "solve_efficiency": 0.5,
    "solve_column_flops": 1.6e7,
    # the inverse Cholesky factors run on one thread: this fraction of one thread's share of the
    # micro-benchmark's rate (4096/8192/14336 wide: 44/56/65 GFLOPS against 168 on 2 threads)
    "factor_efficiency": 0.7,
    # per block parameter, what a streamed block costs beyond its arithmetic (reading it and
    # widening it to float32, oneDNN's packing, packing and writing the result): fitted on
    # streaming GPTQ of smollm2-135m and synthetic smollm2-360m at 16 x 256 (about 0.2 and
    # 0.6 s per block, what their runs took beyond the other parts)
    "stream_seconds_per_param": 0.5e-7,
    "io_gbs": 1.0,  # reading stored weights and writing the packed checkpoint, GB/s
    "fixed_seconds": 25.0,  # start-up, loading, calibration windows, kwargs capture, writing
    "serve_fixed_seconds": 19.0,  # start-up of eval/generate (imports, tokenizer, engine)
    "default_gflops": 30.0,  # used when the micro-benchmark cannot run
    "default_bandwidth_gbs": 5.0,
    "cuda_gflops": 40_000.0,  # assumed for a GPU that is not present here (H100, tf32 off)
    "cuda_bandwidth_gbs": 2000.0,
    "cuda_context_bytes": 600 * MiB,  # host memory the CUDA runtime takes once initialized
    "generate_tokens": 64,  # `tinyllm generate --max-tokens` default
    "quantize_flops_per_weight": 40.0,  # RTN/NF4-like rounding of one weight
}


@dataclass(frozen=True)
class MethodCost:
    """How a method uses a block: forwards per block, workspace, what it keeps."""

    calibrated: bool  # needs calibration windows
    passes: float  # block forwards per block during calibration
    hessian: bool  # accumulates X^T X per linear input and solves (GPTQ, SparseGPT)
    keeps_down_inputs: bool = False  # keeps down_proj's inputs (float16) across a pass
    float_targets: bool = False  # runs a float reference stream beside the compressed one
    stats_bytes_per_channel: int = 0  # per-input-channel statistics (Wanda, AWQ, SmoothQuant)
    packed: bool = True  # the result is packed integer codes (else float, e.g. pruning)


SHARED_INPUT = {"q": "attention input", "k": "attention input", "v": "attention input"}
SHARED_INPUT |= {"gate": "mlp input", "up": "mlp input"}

METHODS: dict[str, MethodCost] = {
    "rtn": MethodCost(False, 0.0, False),
    "nf4": MethodCost(False, 0.0, False),
    "embeddings": MethodCost(False, 0.0, False),
    "int8-dynamic": MethodCost(False, 0.0, False),
    "fp8": MethodCost(False, 0.0, False),
    "magnitude": MethodCost(False, 0.0, False, packed=False),
    # staged GPTQ: one pass observes each stage and computes the block's quantized outputs
    "gptq": MethodCost(True, 1.0, True, keeps_down_inputs=True),
    "mixed": MethodCost(True, 2.0, True, keeps_down_inputs=True),
    "sparsegpt": MethodCost(True, 2.0, True, keeps_down_inputs=True, packed=False),
    "awq": MethodCost(True, 3.0, False, stats_bytes_per_channel=8),
    "wanda": MethodCost(True, 1.0, False, stats_bytes_per_channel=8, packed=False),
    "smoothquant": MethodCost(True, 2.0, False, stats_bytes_per_channel=8),
    "int8-static": MethodCost(True, 1.0, False, stats_bytes_per_channel=8),
    "channels": MethodCost(True, 1.0, False, stats_bytes_per_channel=8, packed=False),
    "heads": MethodCost(True, 1.0, False, stats_bytes_per_channel=8, packed=False),
    "blocks": MethodCost(True, 1.0, False, stats_bytes_per_channel=8, packed=False),
}


@dataclass(frozen=True)
class Linear:
    name: str  # inside its block: mlp.down_proj
    in_features: int
    out_features: int
    role: str = ""  # models.anatomy's: q, k, v, o, gate, up, down, ...

    @property
    def input_group(self) -> str:
        """Linears reading the same input share a Hessian (q/k/v; gate/up)."""
        return SHARED_INPUT.get(self.role, self.name)


@dataclass(frozen=True)
class Shape:
    """What the estimator knows about a model: sizes from config.json, one block's linears."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    tied: bool
    stored_bytes: int  # bytes per stored float value (bf16: 2)
    block_params: int  # every parameter of one decoder block
    linears: tuple[Linear, ...]  # one block's
    other_params: int  # norms outside the blocks

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.embed_params
        return self.layers * self.block_params + self.embed_params + head + self.other_params

    @property
    def linear_params(self) -> int:
        return sum(x.in_features * x.out_features for x in self.linears)


@dataclass(frozen=True)
class Host:
    """The compute device's measured (or assumed) speed."""

    device: str
    gflops: float  # float32 matmul
    bandwidth_gbs: float  # memory read
    measured: bool
    source: str


@dataclass
class Estimate:
    """A job's predicted peak memory and run time, with its parts and assumptions."""

    model: str
    job: str
    method: str | None
    device: str
    peak_bytes: int
    seconds: float
    memory: dict[str, int] = field(default_factory=dict)
    time: dict[str, float] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    device_bytes: int | None = None  # GPU memory, where the job computes on a GPU
    params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        where = f" (GPU {human_bytes(self.device_bytes)})" if self.device_bytes else ""
        what = f"{self.job} {self.method}" if self.method else self.job
        return (
            f"{self.model} {what}: peak RSS ~{human_bytes(self.peak_bytes)}{where}, "
            f"~{self.seconds:.0f} s"
        )


# --- reading a model's shape from its config -------------------------------------------------
def read_config_of(spec: str | Path) -> tuple[str, dict[str, Any], Path | None]:
    """(name, config.json as a dict, the directory holding weights or None) of a registered
    name, a Hugging Face or tinyllm directory, or a path to a config.json file."""
    from tinyllm.models.load import resolve
    from tinyllm.models.validate import check_architecture, check_sizes, read_config

    path = Path(str(spec)).expanduser()
    if path.is_file() and path.suffix == ".json":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path} is unreadable: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path} must hold a JSON object, not {type(raw).__name__}")
        check_architecture(raw, path)
        check_sizes(raw, path)
        return path.parent.name or path.stem, raw, None
    r = resolve(spec)
    if r.kind == "registered":
        return r.name, _registered_config(r.name), None
    if r.kind == "gguf":
        raise ModelLoadError(
            f"{r.path}: estimate reads config.json; give the Hugging Face directory or the "
            "config.json of the model instead of a .gguf file"
        )
    if not (r.path / "config.json").is_file():
        raise ModelLoadError(f"{r.path} has no config.json to estimate from")
    return r.name, read_config(r.path), r.path


def _registered_config(name: str) -> dict[str, Any]:
    """A registered model's config: from its converted checkpoint when present, else from the
    GGUF file's metadata (slower: transformers parses the header and the tokenizer)."""
    from tinyllm.models import registry as models
    from tinyllm.models.load import SOURCE_FILE
    from tinyllm.models.validate import read_config
    from tinyllm.util.fs import cache_dir

    converted = cache_dir("models") / name
    if (converted / SOURCE_FILE).is_file() and (converted / "config.json").is_file():
        return read_config(converted)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    log.info("reading %s's config from its GGUF header (once converted, this is instant)", name)
    gguf = models.gguf_path(models.REGISTRY[name])
    config = dict(load_gguf_checkpoint(str(gguf), return_tensors=False)["config"])
    config.setdefault("dtype", "float32")  # tinyllm converts GGUF weights to float32
    return config


def _stored_bytes(raw: dict[str, Any]) -> int:
    """Bytes per float value as stored: the config's dtype (bf16 when it names none)."""
    name = str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return {"float32": 4, "float64": 8}.get(name, 2)


def _one_block_config(raw: dict[str, Any]) -> Any:
    """transformers' config object for `raw` with one decoder block (per-layer lists cut)."""
    from transformers import AutoConfig

    one = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map")}
    layers = int(one.get("num_hidden_layers") or 1)
    for key, value in raw.items():
        if isinstance(value, list) and len(value) == layers and layers > 1:
            one[key] = value[:1]  # layer_types and friends
    one["num_hidden_layers"] = 1
    model_type = one.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **one)
    except Exception as exc:  # transformers raises many types for a bad config
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(
            f"config.json of a '{model_type}' model is not valid: {first}"
        ) from exc


def shape_of(spec: str | Path) -> Shape:
    """The Shape of a model spec, read from its config (no weights)."""
    from tinyllm.models.anatomy import analyze
    from tinyllm.models.validate import meta_model

    name, raw, _ = read_config_of(spec)
    cfg = _one_block_config(raw)
    model = meta_model(cfg)
    anatomy = analyze(model)
    block = anatomy.blocks[0]
    embed = anatomy.embedding.weight.shape if anatomy.embedding is not None else (0, 0)
    linears = tuple(
        Linear(s.local, s.module.in_features, s.module.out_features, s.role)
        for s in anatomy.block_linears(0)
    )
    tied = anatomy.head is None or anatomy.head.weight is anatomy.embedding.weight
    total = sum(p.numel() for p in model.parameters())  # tied counted once
    head = 0 if tied else embed[0] * embed[1]
    block_params = sum(p.numel() for p in block.parameters())
    return Shape(
        name=name,
        model_type=raw["model_type"],
        hidden=int(embed[1]),
        layers=int(raw.get("num_hidden_layers") or len(anatomy.blocks)),
        heads=int(getattr(cfg, "num_attention_heads", 1) or 1),
        ffn=max((x.in_features for x in linears), default=0),
        vocab=int(embed[0]),
        tied=tied,
        stored_bytes=_stored_bytes(raw),
        block_params=block_params,
        linears=linears,
        other_params=total - block_params - embed[0] * embed[1] - head,
    )


# --- the host: measured float32 matmul rate and memory bandwidth ------------------------------
def host_profile(device: str = "cpu", refresh: bool = False) -> Host:
    """The device's float32 matmul GFLOPS and read bandwidth, measured once (about a second) and
    cached per device, torch version and thread count; a GPU that is not present is assumed."""
    import torch

    from tinyllm.util.fs import cache_dir, write_json_atomic

    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        return Host(device, COSTS["cuda_gflops"], COSTS["cuda_bandwidth_gbs"], False, "assumed")
    key = f"{kind}-linear-torch{torch.__version__}-threads{torch.get_num_threads()}"
    path = cache_dir("host") / "profile.json"
    cached = _read_json(path)
    if key in cached and not refresh:
        c = cached[key]
        return Host(device, c["gflops"], c["bandwidth_gbs"], True, f"cached in {path}")
    try:
        gflops, gbs = _measure(torch.device(device if kind == "cuda" else "cpu"))
    except RuntimeError as exc:  # an odd backend: fall back on the table
        log.warning("host micro-benchmark failed (%s); using the default rates", exc)
        return Host(
            device, COSTS["default_gflops"], COSTS["default_bandwidth_gbs"], False, "default"
        )
    busy = kind == "cpu" and _busy()
    if busy:  # a shared CPU: right for now, wrong to keep (a later estimate would run slow)
        return Host(device, gflops, gbs, True, f"measured now, {busy} (not cached)")
    cached[key] = {"gflops": gflops, "bandwidth_gbs": gbs, "when": time.time()}
    write_json_atomic(path, cached)
    return Host(device, gflops, gbs, True, "measured now")


def _busy() -> str:
    """'' on an idle CPU, else what keeps it busy: the 1-minute load average at or above half
    the cores (the micro-benchmark then measures a share of the CPU, not the CPU)."""
    import os

    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return ""
    return f"load average {load:.1f} on {cores} cores" if load >= cores / 2 else ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _measure(device: Any, seconds: float = 0.4) -> tuple[float, float]:
    """(GFLOPS of a float32 linear of calibration's shape, 4096 tokens x 576 -> 1536 (the
    product benchmarks/HISTORY.md times at ~206 GFLOPS on an idle 2-core host), GB/s of a
    float32 sum over 256 MB)."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(4096, 576, device=device)
    w = torch.randn(1536, 576, device=device)
    rate = _timed(lambda: F.linear(x, w), seconds, device) * 2 * x.numel() * w.shape[0] / 1e9
    big = torch.ones(1 << 26, device=device)  # 256 MB of float32
    gbs = _timed(lambda: big.sum(), seconds, device) * big.numel() * 4 / 1e9
    return rate, gbs


def _timed(fn: Any, seconds: float, device: Any) -> float:
    """Calls of fn per second (after one warm-up), over about `seconds`."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or calls < 2:
        fn()
        calls += 1
    sync()
    return calls / (time.perf_counter() - t0)


# --- the estimates -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """What is estimated: the job and its settings (the CLI's defaults)."""

    job: str = "compress"
    method: str | None = "gptq"
    bits: int = 4
    group_size: int = 128
    samples: int = 128
    seq_len: int = 512
    device: str = "cpu"
    stream: str = "auto"  # compress: on (block by block), off (the model whole), auto


def streams(shape: Shape, job: Job) -> bool:
    """Whether compress streams: as core.stream.should_stream decides for `auto` (the float32
    weights above a share of the memory available now)."""
    if job.stream != "auto":
        return job.stream == "on"
    from tinyllm.core.stream import AUTO_SHARE
    from tinyllm.util.memory import available_bytes

    return 4 * shape.params > AUTO_SHARE * available_bytes()


def method_cost(method: str) -> MethodCost:
    """The cost model of a registered method; unknown names are a ConfigError."""
    if method not in registry.BY_NAME:
        known = ", ".join(METHODS)
        raise ConfigError(f"unknown method '{method}'; estimate knows: {known}")
    if method not in METHODS:
        raise ConfigError(
            f"estimate has no cost model for '{method}' (a {registry.BY_NAME[method].kind} "
            f"step); it models: {', '.join(METHODS)}"
        )
    return METHODS[method]


def check_job(job: Job) -> None:
    """Refuse settings no run could have, naming the setting."""
    if job.job not in JOBS:
        raise ConfigError(f"unknown job '{job.job}'; choose one of {', '.join(JOBS)}")
    if job.samples < 1 or job.seq_len < 2:
        raise ConfigError(
            f"--samples must be >= 1 and --seq-len >= 2, got {job.samples}, {job.seq_len}"
        )
    if not 1 <= job.bits <= 16:
        raise ConfigError(f"--bits must be between 1 and 16, got {job.bits}")
    if job.stream not in ("auto", "on", "off"):
        raise ConfigError(f"stream must be one of auto, on, off, got '{job.stream}'")
    if not (job.device in ("cpu", "auto") or job.device.startswith("cuda")):
        raise ConfigError(f"unknown device '{job.device}'; use cpu, cuda or cuda:N")
    if job.method is not None:
        method_cost(job.method)
    elif job.job == "compress":
        raise ConfigError("a compress estimate needs --method (gptq, awq, rtn, wanda, ...)")


def packed_linear_bytes(shape: Shape, job: Job) -> int:
    """One block's linears after the method: packed codes and float16 scales plus uint8 zero
    points per group, or float values where the method does not pack."""
    if job.method is None or not METHODS[job.method].packed or job.method == "embeddings":
        return shape.linear_params * int(COSTS["checkpoint_float_bytes"])
    total = 0
    for x in shape.linears:
        group = x.in_features if job.group_size in (-1, 0) else job.group_size
        groups = x.out_features * math.ceil(x.in_features / group)
        total += math.ceil(x.in_features * x.out_features * job.bits / 8) + 3 * groups
    return total


def _widest(shape: Shape) -> Linear:
    return max(shape.linears, key=lambda x: (x.in_features, x.out_features))


def compress_memory(shape: Shape, job: Job) -> dict[str, int]:
    """The parts of a compression's peak memory, in bytes. Streaming has two phases: the input
    embeddings are read (in their stored dtype) to compute the first block's inputs, then given
    back (core/placement.py) before any block is read; the parts are those of the larger phase
    (embedding_phase names the other)."""
    m = METHODS[job.method]
    parts = {"process baseline": int(COSTS["baseline_bytes"])}
    if m.calibrated:
        parts |= calibration_memory(shape, job, m)
    block = block_memory(shape, job, m)
    if not streams(shape, job):
        parts["the whole model in float32 (not streamed)"] = 4 * shape.params
        block["one block in float32 (x2 in forward)"] = int(4 * shape.block_params)
        return parts | block
    first = embedding_phase(shape, job)
    return first if sum(first.values()) > sum((parts | block).values()) else parts | block


def embedding_phase(shape: Shape, job: Job) -> dict[str, int]:
    """A streamed compression's memory while the input embeddings are held: computing the first
    block's inputs (calibrated methods) or writing the tensors outside the blocks at the end."""
    parts = {
        "process baseline": int(COSTS["baseline_bytes"]),
        "input embeddings (stored dtype)": shape.embed_params * shape.stored_bytes,
    }
    if METHODS[job.method].calibrated:
        parts["calibration hidden states (x1, float32)"] = (
            job.samples * job.seq_len * shape.hidden * 4
        )
    return parts


def block_memory(shape: Shape, job: Job, m: MethodCost) -> dict[str, int]:
    """What one block's work holds: its float32 weights (twice during its forward), the
    method's workspace, one batch's transients and the freed small buffers kept."""
    wide = _widest(shape)
    weight = 4 * wide.in_features * wide.out_features
    parts = {
        "one block in float32 (x2 in forward)": int(
            4 * shape.block_params * COSTS["forward_pack_factor"]
        )
    }
    if m.hessian:
        hessians = COSTS["hessian_copies"] * 4 * wide.in_features**2
        parts["method workspace (Hessians)"] = int(hessians + weight)
    else:
        stats = m.stats_bytes_per_channel * sum(x.in_features for x in shape.linears)
        parts["method workspace"] = weight + stats
    if m.calibrated:
        batch = min(int(COSTS["calib_batch"]), job.samples)
        transient = batch * job.seq_len * shape.ffn * 4 * COSTS["transient_ffn_copies"]
        scores = batch * shape.heads * job.seq_len**2 * 4 * COSTS["attention_scores"]
        parts["one batch's transients"] = int(transient + scores)
    if not job.device.startswith("cuda"):
        retained = COSTS["retained_share"] * sum(small_buffers(shape, job, m))
        parts["freed small buffers the allocator keeps"] = int(retained)
    return parts


def small_buffers(shape: Shape, job: Job, m: MethodCost) -> list[int]:
    """Sizes of the buffers one block's work allocates that are below the C allocator's mmap
    threshold: freed, they stay in the process's heap (and its RSS) instead of going back to
    the system: half their size is counted (fitted on streaming GPTQ runs of synthetic
    smollm2-360m and Llama-3.2-1B shapes, where most block buffers are that small)."""
    batch = min(int(COSTS["calib_batch"]), job.samples)
    rows = batch * job.seq_len
    sizes = [4 * x.in_features * x.out_features for x in shape.linears] * 2  # weight + packed
    if m.hessian:
        groups = {x.input_group: x.in_features for x in shape.linears}
        sizes += [4 * n * n for n in groups.values()] * int(COSTS["hessian_copies"])
    if m.calibrated:
        sizes += [4 * rows * shape.ffn] * int(COSTS["transient_ffn_copies"])
        sizes += [4 * rows * shape.hidden] * 4
        sizes.append(4 * batch * shape.heads * job.seq_len**2)
    return [n for n in sizes if n < COSTS["mmap_threshold_bytes"]]


def calibration_memory(shape: Shape, job: Job, m: MethodCost) -> dict[str, int]:
    """Calibration activations held across blocks, in bytes: the hidden states, and what a
    staged pass keeps for replay (o_proj's inputs, down_proj's in float16) where each fits
    core.calib.KEEP_STAGE_BYTES (above it the module is recomputed: recomputed_flops)."""
    tokens = job.samples * job.seq_len
    kept_o, kept_down = kept_replays(shape, job, m)
    streams = 1 + int(kept_o) + (1 if m.float_targets else 0)
    parts = {
        f"calibration hidden states (x{streams}, float32)": tokens * shape.hidden * 4 * streams
    }
    if kept_down:
        parts["down_proj inputs (float16)"] = tokens * shape.ffn * 2
    return parts


def kept_replays(shape: Shape, job: Job, m: MethodCost) -> tuple[bool, bool]:
    """(a second copy of the hidden states, down_proj's inputs kept): a staged pass keeps each
    where it fits core.calib.KEEP_STAGE_BYTES (o_proj's inputs are that copy); other calibrated
    methods hold inputs and outputs of a block pass."""
    from tinyllm.core.calib import KEEP_STAGE_BYTES

    if not m.keeps_down_inputs:
        return True, False
    tokens = job.samples * job.seq_len
    return (
        tokens * shape.hidden * 4 <= KEEP_STAGE_BYTES,
        tokens * shape.ffn * 2 <= KEEP_STAGE_BYTES,
    )


def recomputed_flops(shape: Shape, job: Job, m: MethodCost) -> float:
    """FLOPs per block a staged pass spends recomputing what it does not keep: attention up to
    o_proj, the MLP up to down_proj (kept_replays)."""
    if not m.keeps_down_inputs:
        return 0.0
    kept_o, kept_down = kept_replays(shape, job, m)
    tokens = job.samples * job.seq_len
    roles = set() if kept_o else {"q", "k", "v"}
    roles |= set() if kept_down else {"gate", "up"}
    flops = sum(
        2.0 * tokens * x.in_features * x.out_features for x in shape.linears if x.role in roles
    )
    return flops + (0.0 if kept_o else 2.0 * tokens * job.seq_len * shape.hidden)


def block_forward_flops(shape: Shape, tokens: int, seq_len: int) -> float:
    """FLOPs of one block's forward over `tokens` tokens in windows of `seq_len` (causal)."""
    return 2.0 * shape.linear_params * tokens + 2.0 * tokens * seq_len * shape.hidden


def compress_time(shape: Shape, job: Job, host: Host) -> dict[str, float]:
    """The parts of a compression's run time, in seconds."""
    m = METHODS[job.method]
    tokens = job.samples * job.seq_len
    rate = host.gflops * 1e9
    parts: dict[str, float] = {"start-up, calibration data, metadata": COSTS["fixed_seconds"]}
    if m.calibrated:
        fwd = m.passes * block_forward_flops(shape, tokens, job.seq_len)
        parts["block forwards"] = shape.layers * fwd / (rate * COSTS["matmul_efficiency"])
        again = recomputed_flops(shape, job, m)
        if again:
            parts["recomputed, not kept"] = (
                shape.layers * again / (rate * COSTS["matmul_efficiency"])
            )
    if m.hessian:
        groups = {x.input_group: x.in_features for x in shape.linears}
        hess = sum(1.0 * tokens * n**2 for n in groups.values())
        solve = sum(2.0 * x.out_features * x.in_features**2 for x in shape.linears)
        stacks = {(x.input_group, x.out_features): x.in_features for x in shape.linears}
        columns = COSTS["solve_column_flops"] * sum(stacks.values())
        parts["Hessians"] = shape.layers * hess / (rate * COSTS["hessian_efficiency"])
        parts["solves"] = shape.layers * (solve / COSTS["solve_efficiency"] + columns) / rate
        # each layer's reported output error (core.hessian.output_error: D H and W H)
        checks = sum(4.0 * x.out_features * x.in_features**2 for x in shape.linears)
        parts["output errors"] = shape.layers * checks / (rate * COSTS["matmul_efficiency"])
        parts["inverse Cholesky factors (one thread)"] = shape.layers * factor_seconds(
            groups.values(), host
        )
    else:
        flops = COSTS["quantize_flops_per_weight"] * shape.linear_params
        parts["rounding"] = shape.layers * flops / (rate * COSTS["matmul_efficiency"])
    moved = shape.params * shape.stored_bytes + shape.layers * packed_linear_bytes(shape, job)
    parts["reading and writing weights"] = moved / (COSTS["io_gbs"] * 1e9)
    if streams(shape, job):
        per_param = COSTS["stream_seconds_per_param"]
        parts["streamed blocks: widening, packing"] = shape.layers * shape.block_params * per_param
    return parts


def factor_seconds(widths: Any, host: Host) -> float:
    """Seconds of one block's inverse Cholesky factors (core.hessian.inverse_cholesky: Cholesky,
    inverse, Cholesky again, about 4/3 n^3 FLOPs per distinct input of width n). They run on one
    thread, so their bits do not depend on the thread count: at one thread's share of the rate."""
    import torch

    threads = 1 if host.device.startswith("cuda") else max(1, torch.get_num_threads())
    rate = host.gflops * 1e9 / threads * COSTS["factor_efficiency"]
    return sum(4.0 / 3.0 * n**3 for n in widths) / rate


def lean(float_params: int) -> bool:
    """Whether tinyllm.load(inference=True) keeps float tables narrow: their float32 size above
    half the memory available now (docs/streaming.md, lean loading)."""
    from tinyllm.util.memory import available_bytes

    return 4 * float_params > COSTS["lean_share"] * available_bytes()


def serve_weights(shape: Shape, job: Job, checkpoint_bytes: int | None) -> dict[str, int]:
    """Memory of the weights an eval or generate job holds. A Hugging Face model: float32 (bf16
    when lean) plus the stored file pages resident while it loads. A tinyllm checkpoint (its
    files, `checkpoint_bytes`) or, with `job.method`, the checkpoint that method would write
    (the blocks' linears packed, the rest float16): float tables widened to float32 unless
    lean."""
    other = shape.params - shape.layers * shape.linear_params
    if job.method is None and checkpoint_bytes is None:
        width = 2 if lean(shape.params) else int(COSTS["loaded_float_bytes"])
        stored = shape.params * shape.stored_bytes * COSTS["load_transient_share"]
        return {
            f"weights in {8 * width}-bit floats (as loaded)": shape.params * width,
            "stored file pages while loading": int(stored),
        }
    if checkpoint_bytes is not None and job.method is None:
        parts = {"weights (the checkpoint's files)": checkpoint_bytes}
    else:
        packed = shape.layers * packed_linear_bytes(shape, job)
        parts = {"weights (the compressed checkpoint)": packed + other * 2}
    if not lean(other):
        parts["float tables widened to float32"] = 2 * other
    return parts


def serve_memory(shape: Shape, job: Job, weights: dict[str, int]) -> dict[str, int]:
    """The parts of an eval or generate job's peak memory, in bytes."""
    parts = {"process baseline": int(COSTS["baseline_bytes"]), **weights}
    if job.job == "generate":
        parts["KV cache (--kv-memory)"] = int(COSTS["kv_cache_bytes"])
        return parts
    tokens = int(COSTS["eval_batch_tokens"])
    parts["activations of one forward"] = tokens * (4 * shape.hidden * 4 + 3 * shape.ffn * 4)
    parts["logits and log-probabilities"] = 2 * tokens * shape.vocab * 4
    return parts


def serve_time(shape: Shape, job: Job, weights: int, host: Host) -> dict[str, float]:
    """The parts of an eval or generate job's run time, in seconds."""
    parts = {
        "start-up and loading": COSTS["serve_fixed_seconds"] + weights / (COSTS["io_gbs"] * 1e9)
    }
    if job.job == "generate":
        per_token = weights / (host.bandwidth_gbs * 1e9)
        parts[f"{int(COSTS['generate_tokens'])} tokens at {per_token * 1e3:.0f} ms"] = (
            per_token * COSTS["generate_tokens"]
        )
        return parts
    seq = int(COSTS["eval_seq_len"])
    tokens = int(COSTS["eval_windows"]) * seq
    head = 2.0 * shape.vocab * shape.hidden * tokens
    flops = shape.layers * block_forward_flops(shape, tokens, seq) + head
    parts["forwards"] = flops / (host.gflops * 1e9 * COSTS["matmul_efficiency"])
    return parts


def checkpoint_bytes(directory: Path | None) -> int | None:
    """Total size of a tinyllm checkpoint's safetensors files (stat only); None for anything
    else."""
    from tinyllm.models.load import TINYLLM_CONFIG

    if directory is None or not (directory / TINYLLM_CONFIG).is_file():
        return None
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def estimate(
    spec: str | Path | Shape, job: Job | None = None, host: Host | None = None
) -> Estimate:
    """Predict `job` on the model `spec` names (or a Shape): peak memory, seconds, their parts
    and what was assumed."""
    job = job or Job()
    check_job(job)
    directory = None
    if isinstance(spec, Shape):
        shape = spec
    else:
        shape = shape_of(spec)
        directory = read_config_of(spec)[2]
    host = host or host_profile("cpu" if job.device == "auto" else job.device)
    if job.job == "compress":
        memory, seconds = compress_memory(shape, job), compress_time(shape, job, host)
    else:
        weights = serve_weights(shape, job, checkpoint_bytes(directory))
        resident = sum(v for k, v in weights.items() if "while loading" not in k)
        memory = serve_memory(shape, job, weights)
        seconds = serve_time(shape, job, resident, host)
    est = Estimate(
        shape.name,
        job.job,
        job.method,
        host.device,
        sum(memory.values()),
        sum(seconds.values()),
        memory,
        seconds,
        assumptions(shape, job, host),
        params=shape.params,
    )
    if host.device.startswith("cuda"):
        _split_device(est)
    return est


def _split_device(est: Estimate) -> None:
    """On a GPU: the block, workspace, activations and weights live in device memory; the host
    keeps the baseline, the embeddings and the CUDA runtime."""
    host_parts = ("process baseline", "input embeddings")
    on_host = sum(v for k, v in est.memory.items() if k.startswith(host_parts))
    est.device_bytes = est.peak_bytes - on_host
    est.memory["CUDA runtime (host)"] = int(COSTS["cuda_context_bytes"])
    est.peak_bytes = on_host + int(COSTS["cuda_context_bytes"])


def assumptions(shape: Shape, job: Job, host: Host) -> list[str]:
    """What the estimate took for granted, in words."""
    dtype = {2: "16-bit", 4: "float32", 8: "float64"}[shape.stored_bytes]
    said = [
        f"{shape.name}: {shape.params / 1e9:.3f} B parameters, {shape.layers} blocks, "
        f"hidden {shape.hidden}, widest linear input {shape.ffn}, vocabulary {shape.vocab}, "
        f"stored {dtype}{', tied head' if shape.tied else ''}",
        f"{host.device}: {host.gflops:.0f} GFLOPS float32 matmul, {host.bandwidth_gbs:.1f} GB/s "
        f"({host.source})",
    ]
    if job.job == "compress":
        m = METHODS[job.method]
        how = "streaming, one block at a time" if streams(shape, job) else "the model whole"
        said.append(
            f"compression {how} (--stream {job.stream}); {job.method}: "
            f"{m.passes:g} block forwards per block" + (", Hessians" if m.hessian else "")
        )
        if m.calibrated:
            batch = min(int(COSTS["calib_batch"]), job.samples)
            said.append(f"calibration {job.samples} x {job.seq_len} tokens, batches of {batch}")
        if streams(shape, job):
            emb = human_bytes(sum(embedding_phase(shape, job).values()))
            said.append(
                f"the input embeddings are held only before and after the blocks (that phase: "
                f"{emb}); the peak is the larger phase's"
            )
    if job.job != "compress" or METHODS[job.method].packed:
        if job.method:
            said.append(
                f"block linears {job.bits}-bit, groups of {job.group_size}; the rest "
                "float16 (as the checkpoint stores it)"
            )
        else:
            said.append(
                "weights as tinyllm.load holds them: a Hugging Face model in float32, "
                "a tinyllm checkpoint as its files"
            )
    return said


def check_fits(
    estimates: list[Estimate], host_budget: int, device_budget: int | None = None
) -> None:
    """Refuse (ConfigError, with the numbers) jobs whose predicted peak exceeds a budget."""
    for e in estimates:
        if e.peak_bytes > host_budget:
            raise ConfigError(_too_big(e, e.peak_bytes, host_budget, "host memory"))
        if e.device_bytes and device_budget is not None and e.device_bytes > device_budget:
            raise ConfigError(_too_big(e, e.device_bytes, device_budget, "GPU memory"))


def _too_big(e: Estimate, need: int, budget: int, what: str) -> str:
    top = sorted(e.memory.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in top)
    return (
        f"{e.model}: the {e.job} job ({e.method or 'as stored'}) needs about {human_bytes(need)} "
        f"of {what} but {human_bytes(budget)} is available (largest parts: {parts}); use fewer "
        "or shorter calibration windows, a smaller model, or a machine with more memory "
        f"(`tinyllm estimate {e.model} --job {e.job}` shows every part)"
    )


def memory_budget(device: str = "cpu") -> tuple[int, int | None]:
    """(host memory, GPU memory or None) this machine offers: physical totals."""
    import psutil
    import torch

    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        gpu = int(torch.cuda.get_device_properties(index).total_memory)
    return int(psutil.virtual_memory().total), gpu
