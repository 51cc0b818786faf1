"""`tinyllm generate`, `bench` and `serve`: the tinyllm runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tinyllm.cli._common import (
    DeviceOpt,
    DraftOpt,
    Int8ActOpt,
    JsonOpt,
    KvDtypeOpt,
    KvOpt,
    ModelArg,
    SpeculateOpt,
    _make_step,
    device_of,
    err,
    help_text,
    out,
)
from tinyllm.cli.app import app

GENERATE_HELP = """Generate text with the tinyllm runtime, streaming tokens as they come.

Llama, Qwen2, Mistral and Gemma 3 checkpoints (float, quantized with packed INT4/INT8 kernels,
pruned) run on the lean forward; other families fall back to the transformers model (a warning
says why). --speculate K verifies drafts of up to K tokens per step (prompt lookup, or a draft
model with --draft DIR): the same output as plain decoding, faster when drafts are accepted.

Example:

  tinyllm generate runs/edge/final "The capital of France is" --max-tokens 20
"""

SERVE_HELP = """OpenAI-compatible server: /v1/completions, /v1/chat/completions (SSE streaming),
/v1/models, /health, /metrics (Prometheus).

Example, then a client in Python:

  tinyllm serve runs/edge/final --api-key sk-local --target-itl 80

  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
"""


def _engine(
    model: str,
    kv_memory: float,
    kv_dtype: str,
    int8_act: bool,
    device: str,
    scheduler=None,
    speculate: int = 0,
    draft: str | None = None,
):
    """Load MODEL into an engine on DEVICE with the KV and kernel options (and a scheduler);
    DRAFT, a draft model for speculative decoding (4 tokens a step unless SPECULATE says)."""
    from tinyllm.runtime.engine import EngineConfig, load_engine
    from tinyllm.runtime.scheduler import SchedulerConfig

    cfg = EngineConfig(
        kv_memory_mb=kv_memory,
        kv_dtype=kv_dtype,
        int8_activations=int8_act,
        scheduler=scheduler or SchedulerConfig(),
        speculate=speculate or (DRAFT_TOKENS if draft else 0),
        # checked before the model loads; --int8-act's kernels are CPU ones, so auto means cpu
        device=device_of("cpu" if int8_act and device == "auto" else device),
    )
    return load_engine(model, cfg, draft)


DRAFT_TOKENS = 4  # --draft without --speculate


@app.command(help=help_text(GENERATE_HELP))
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt in the model's chat template.")
    ] = False,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(min=0, help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="Keep the k likeliest tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option(min=0.01, max=1, help="Nucleus mass.")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(min=0.01, help="1 = off.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    kv_memory: KvOpt = 64.0,
    kv_dtype: KvDtypeOpt = "float16",
    int8_act: Int8ActOpt = False,
    speculate: SpeculateOpt = 0,
    draft: DraftOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    from tinyllm.runtime.sampling import SamplingParams

    params = _make_step(
        SamplingParams,
        "sampling",
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop or [],
    )
    engine = _engine(model, kv_memory, kv_dtype, int8_act, device, None, speculate, draft)
    ids = engine.prompt_ids(prompt, chat=chat)
    [seq] = engine.generate(
        [ids], params, sink=lambda ev: out.print(ev.text, end="", highlight=False)
    )
    out.print()
    err.print(
        f"[dim]{len(seq.output)} tokens, finish: {seq.finish_reason}, "
        f"decode {seq.decode_tokens_per_s:.1f} tokens/s[/]"
    )


@app.command()
def bench(
    model: ModelArg,
    concurrency: Annotated[str, typer.Option(help="Comma-separated stream counts.")] = "1,4,16",
    prompt_len: Annotated[int, typer.Option(min=1, help="Prompt tokens per stream.")] = 64,
    gen_len: Annotated[int, typer.Option(min=1, help="Tokens generated per stream.")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Runs per level; the median is shown.")] = 3,
    kv_memory: KvOpt = 256.0,
    kv_dtype: KvDtypeOpt = "float16",
    int8_act: Int8ActOpt = False,
    speculate: SpeculateOpt = 0,
    draft: DraftOpt = None,
    json_out: JsonOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Serve N concurrent streams and print TTFT, inter-token latency p50/p95/p99, tokens/s, KV
    and energy per generated token (J/token, from RAPL/NVML counters where the host has them).

    Example: tinyllm bench runs/edge/final --concurrency 1,4,16 --prompt-len 64 --gen-len 64
    """
    from tinyllm.runtime.bench import COLUMNS, bench_scheduler, parse_levels
    from tinyllm.runtime.bench import bench as run_bench

    levels = parse_levels(concurrency)
    engine = _engine(
        model, kv_memory, kv_dtype, int8_act, device, bench_scheduler(levels), speculate, draft
    )
    rows = run_bench(engine, levels, prompt_len, gen_len, repeats)
    table = Table(title=f"tinyllm bench {model} (prompt {prompt_len}, generate {gen_len})")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*r.cells())
    out.print(table)
    out.print(f"KV bytes per token: {rows[0].kv_bytes_per_token:,}")
    out.print(f"energy: {rows[0].energy_source}")
    if json_out:
        from tinyllm.util.fs import write_json_atomic

        write_json_atomic(json_out, [r.to_dict() for r in rows])


# `serve`'s options, one alias each (the signature stays readable)
ApiKeyOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Accept this key (repeatable; each key is its own tenant). Keys also come from "
        "--api-key-file, --tenants and TINYLLM_API_KEYS (comma-separated); none: no auth, "
        "allowed only on loopback unless --insecure."
    ),
]
ApiKeyFileOpt = Annotated[
    Path | None, typer.Option(help="File of API keys, one a line (# comments).")
]
TenantsOpt = Annotated[
    Path | None,
    typer.Option(
        help="YAML: tenants: [{name, key, weight > 0, priority, max_concurrency >= 1, "
        "max_queue >= 1}]"
    ),
]
InsecureOpt = Annotated[
    bool, typer.Option(help="Allow binding beyond loopback with no API key (warns).")
]
AllowedHostOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Host header name to answer besides IP literals, localhost and --host "
        "(repeatable; '*' for any). Others get 421 (DNS rebinding guard)."
    ),
]
PublicMetricsOpt = Annotated[
    bool, typer.Option(help="Serve /metrics without a key even when keys are set.")
]
RequestTimeoutOpt = Annotated[
    float, typer.Option(min=1, help="Seconds a request may take in all; then 503 + Retry-After.")
]
MaxQueueWaitOpt = Annotated[
    float,
    typer.Option(min=0.1, help="Seconds a request may wait to start; then 429 + Retry-After."),
]
TargetItlOpt = Annotated[
    float | None,
    typer.Option(
        help="Target p95 inter-token latency, ms: the batch shrinks above it and new work gets 429."
    ),
]


@app.command(help=help_text(SERVE_HELP))
def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 exposes it).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: ApiKeyOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    tenants: TenantsOpt = None,
    insecure: InsecureOpt = False,
    allowed_host: AllowedHostOpt = None,
    public_metrics: PublicMetricsOpt = False,
    request_timeout: RequestTimeoutOpt = 600.0,
    max_queue_wait: MaxQueueWaitOpt = 120.0,
    name: Annotated[str | None, typer.Option(help="Model id the API shows (default: MODEL).")] = (
        None
    ),
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoding at once.")] = 32,
    max_queue: Annotated[int, typer.Option(min=1, help="Waiting requests before 429.")] = 256,
    target_itl: TargetItlOpt = None,
    kv_memory: KvOpt = 256.0,
    kv_dtype: KvDtypeOpt = "float16",
    int8_act: Int8ActOpt = False,
    speculate: SpeculateOpt = 0,
    draft: DraftOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    from tinyllm.runtime.scheduler import SchedulerConfig
    from tinyllm.runtime.server import ServerLimits, server_keys
    from tinyllm.runtime.server import serve as run_server

    files = [str(f) if f else None for f in (api_key_file, tenants)]
    keys = server_keys(host, insecure, api_key or [], *files)  # refused before loading
    hosts = tuple(allowed_host or ())
    limits = ServerLimits(
        request_timeout=request_timeout,
        max_queue_wait=max_queue_wait,
        bind_host=host,
        allowed_hosts=hosts,
        public_metrics=public_metrics,
    )
    target = None if target_itl is None else target_itl / 1000
    scheduler = SchedulerConfig(max_batch=max_batch, max_queue=max_queue, target_itl_p95=target)
    engine = _engine(model, kv_memory, kv_dtype, int8_act, device, scheduler, speculate, draft)
    auth = "API keys required" if keys else "no auth"
    err.print(f"serving {name or model} on http://{host}:{port}/v1 ({auth}); Ctrl-C stops")
    run_server(engine, name or model, keys, host, port, limits)
