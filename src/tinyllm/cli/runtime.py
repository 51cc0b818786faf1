"""`tinyllm generate`, `bench` and `serve`: the tinyllm runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tinyllm.cli._common import (
    Int8ActOpt,
    KvDtypeOpt,
    KvOpt,
    ModelArg,
    _make_step,
    err,
    out,
)
from tinyllm.cli.app import app
from tinyllm.errors import ConfigError


def _engine(
    model: str, kv_memory: float, kv_dtype: str = "float16", int8_act: bool = False, **sched: object
):
    from tinyllm.core.load import load
    from tinyllm.runtime.engine import Engine, EngineConfig
    from tinyllm.runtime.scheduler import SchedulerConfig

    m, tok = load(model)
    cfg = EngineConfig(
        kv_memory_mb=kv_memory,
        kv_dtype=kv_dtype,
        int8_activations=int8_act,
        scheduler=SchedulerConfig(**sched),
    )
    return Engine(m, tok, cfg)


@app.command()
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
) -> None:
    """Generate text with the tinyllm runtime, streaming tokens as they come.

    Runs FP, quantized (packed INT4/INT8 kernels) and pruned Llama-family checkpoints directly.
    Example: tinyllm generate runs/edge/final "The capital of France is" --max-tokens 20
    """
    from tinyllm.runtime.sampling import SamplingParams

    engine = _engine(model, kv_memory, kv_dtype, int8_act)
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
    ids = engine.prompt_ids(prompt, chat=chat)
    seq = engine.submit(ids, params, sink=lambda ev: out.print(ev.text, end="", highlight=False))
    while seq.finish_reason is None:
        engine.step()
    out.print()
    rate = (
        (len(seq.token_times) - 1) / max(1e-9, seq.token_times[-1] - seq.token_times[0])
        if len(seq.token_times) > 1
        else float("nan")
    )
    err.print(
        f"[dim]{len(seq.output)} tokens, finish: {seq.finish_reason}, decode {rate:.1f} tokens/s[/]"
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
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write rows here.")] = None,
) -> None:
    """Serve N concurrent streams and print TTFT, inter-token latency p50/p95/p99, tokens/s, KV.

    Example: tinyllm bench runs/edge/final --concurrency 1,4,16 --prompt-len 64 --gen-len 64
    """
    from tinyllm.runtime.bench import bench as run_bench

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(
            f"--concurrency takes numbers like 1,4,16 (got '{concurrency}')"
        ) from None
    if not levels or min(levels) < 1:
        raise ConfigError(f"--concurrency takes positive numbers like 1,4,16 (got '{concurrency}')")
    engine = _engine(
        model, kv_memory, kv_dtype, int8_act, max_batch=max(levels), max_queue=max(levels) * 2
    )
    rows = run_bench(engine, levels, prompt_len, gen_len, repeats)
    t = Table(title=f"tinyllm bench {model} (prompt {prompt_len}, generate {gen_len})")
    for col in (
        "streams",
        "tokens/s",
        "decode tok/s",
        "TTFT p50 ms",
        "ITL p50 ms",
        "ITL p95 ms",
        "ITL p99 ms",
        "KV peak MiB",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r.concurrency),
            f"{r.tokens_per_s:.1f}",
            f"{r.decode_tokens_per_s:.1f}",
            f"{r.ttft_p50_ms:.0f}",
            f"{r.itl_p50_ms:.1f}",
            f"{r.itl_p95_ms:.1f}",
            f"{r.itl_p99_ms:.1f}",
            f"{r.kv_peak_mib:.1f}",
        )
    out.print(t)
    out.print(f"KV bytes per token: {rows[0].kv_bytes_per_token:,}")
    if json_out:
        from tinyllm.util.fs import write_json_atomic

        write_json_atomic(json_out, [r.to_dict() for r in rows])


@app.command()
def serve(
    model: ModelArg,
    host: Annotated[
        str, typer.Option(help="Interface to bind (0.0.0.0 exposes it).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            help="Accept this key (repeatable; each key is its own tenant). Keys also come from "
            "--api-key-file, --tenants and TINYLLM_API_KEYS (comma-separated); none: no auth, "
            "allowed only on loopback unless --insecure."
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File of API keys, one a line (# comments).")
    ] = None,
    tenants: Annotated[
        Path | None,
        typer.Option(
            help="YAML: tenants: [{name, key, weight > 0, priority, max_concurrency >= 1, "
            "max_queue >= 1}]"
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Allow binding beyond loopback with no API key (warns).")
    ] = False,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            help="Host header name to answer besides IP literals, localhost and --host "
            "(repeatable; '*' for any). Others get 421 (DNS rebinding guard)."
        ),
    ] = None,
    public_metrics: Annotated[
        bool, typer.Option(help="Serve /metrics without a key even when keys are set.")
    ] = False,
    request_timeout: Annotated[
        float,
        typer.Option(min=1, help="Seconds a request may take in all; then 503 + Retry-After."),
    ] = 600.0,
    max_queue_wait: Annotated[
        float,
        typer.Option(min=0.1, help="Seconds a request may wait to start; then 429 + Retry-After."),
    ] = 120.0,
    name: Annotated[
        str | None, typer.Option(help="Model id the API shows (default: MODEL).")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoding at once.")] = 32,
    max_queue: Annotated[int, typer.Option(min=1, help="Waiting requests before 429.")] = 256,
    target_itl: Annotated[
        float | None,
        typer.Option(
            help="Target p95 inter-token latency, ms: "
            "the batch shrinks above it and new work gets 429."
        ),
    ] = None,
    kv_memory: KvOpt = 256.0,
    kv_dtype: KvDtypeOpt = "float16",
    int8_act: Int8ActOpt = False,
) -> None:
    """OpenAI-compatible server: /v1/completions, /v1/chat/completions (SSE streaming),
    /v1/models, /health, /metrics (Prometheus).

    Example: tinyllm serve runs/edge/final --api-key sk-local --target-itl 80
    then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
    """
    from tinyllm.runtime.server import ServerLimits, check_exposure, load_tenants
    from tinyllm.runtime.server import serve as run_server

    keys = load_tenants(
        str(tenants) if tenants else None,
        api_key or [],
        str(api_key_file) if api_key_file else None,
    )
    check_exposure(host, keys, insecure)
    limits = ServerLimits(
        request_timeout=request_timeout,
        max_queue_wait=max_queue_wait,
        bind_host=host,
        allowed_hosts=tuple(allowed_host or ()),
        public_metrics=public_metrics,
    )
    target = None if target_itl is None else target_itl / 1000
    engine = _engine(
        model,
        kv_memory,
        kv_dtype,
        int8_act,
        max_batch=max_batch,
        max_queue=max_queue,
        target_itl_p95=target,
    )
    err.print(
        f"serving {name or model} on http://{host}:{port}/v1 "
        f"({'API keys required' if keys else 'no auth'}); Ctrl-C stops"
    )
    run_server(engine, name or model, keys, host, port, limits)
