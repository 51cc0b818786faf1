"""Issue 8 table: the tinyllm runtime on smollm2-135m against transformers and llama.cpp.

Run: .venv/bin/python benchmarks/bench_runtime.py [--rows NAME,...] [--force] [--table]
Rows:
  decode   batch-1 decode tokens/s, interleaved repeats in one process: tinyllm engine INT4
           (RTN 4-bit g32 sym, the Q4_0 grid, + 8-bit embeddings), transformers `generate` on
           that same model and on FP32, the engine on FP32; then `llama-bench -n 64 -t 2` on the
           Q4_0 GGUF carrying the same integers (`tinyllm export --type q4_0`).
  prefill  one 512-token prompt (enwiki text) through the engine's forward (RuntimeLM: a
           prefill chunk, the last position's logits), INT4: exact (the packed kernel's float
           path), --int8-act (int8 activations per block of 32, the integer kernel), and the
           modules one by one (each weight unpacked to float for a float GEMM, what prefill ran
           before); interleaved medians; then `llama-bench -p 512 -n 0` on the Q4_0 file.
  gemma    Gemma-3-270M INT4 (same recipe) in the engine, in process: 1 and 16 streams of 64
           prompt + 64 generated tokens, exact and --int8-act; `llama-bench -n 64` on its Q4_0
           export.
  speculate batch-1 greedy decode with prompt-lookup speculation (--speculate 4) against none,
           on an extractive and a free-text prompt: tokens/s, identical outputs, drafts accepted.
  draft    the same prompts and INT4 model with a draft model (--draft): SmolLM2-135M with the
           DRAFT_DROP blocks of least influence dropped (`tinyllm prune --method blocks`, no
           training), quantized the same way; --speculate 2 and 4 against none.
  static   tensor allocations in one steady-state decode step (torch profiler) and decode tokens/s
           at 1 and 16 streams, the engine's workspace against the same engine without it
           (the allocating path), interleaved; SmolLM2 and Gemma 3 INT4.
  streams  aggregate decode tokens/s with 1 and 16 concurrent streams over HTTP, each stream
           64 prompt + 64 generated tokens: `tinyllm serve` (INT4) and `llama-server -np 16`
           (the Q4_0 file), both 2 threads, driven by the same client.
  kv       KV bytes per token (pool bytes / slots) against 2 x layers x kv_heads x head_dim x
           bytes; 500 requests through the server, every fifth dropped mid-stream: blocks in use
           after.
  load     1000 streaming requests at concurrency 64 against `tinyllm serve --max-queue 32
           --max-batch 16`, once with a 429 final and once with clients honouring Retry-After:
           completed vs 429, none hanging (30 s client timeout), server RSS after each 100
           requests, p99 TTFT of admitted requests.
  throttle 48 streams at once against --max-batch 32, without and with --target-itl 60:
           inter-token latency p50/p95 of admitted streams, 429s, tokens/s.
Artifacts live in benchmarks/work/runtime; results merge into
benchmarks/results/runtime_smollm2.json row by row.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

from bench_gguf import CLI, MODEL, run, tool
from rowtable import row_args, run_rows

ROOT = Path(__file__).parent
OUT = ROOT / "results" / "runtime_smollm2.json"
WORK = ROOT / "work" / "runtime"
ROWS = [
    "decode",
    "prefill",
    "streams",
    "kv",
    "load",
    "throttle",
    "gemma",
    "speculate",
    "draft",
    "static",
    "head",
]
GEMMA = "gemma3-270m"
THREADS = 2


def int4_checkpoint(model: str = MODEL) -> Path:
    ckpt = WORK / ("int4" if model == MODEL else f"{model}-int4")
    if not (ckpt / "tinyllm.json").exists():
        flags = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--sym"]
        run([*CLI, "quantize", model, *flags, "--embed-bits", "8", "-o", str(ckpt)])
    return ckpt


def draft_checkpoint(drop: int) -> Path:
    """SmolLM2-135M less its `drop` least influential blocks, quantized as int4_checkpoint."""
    ckpt = WORK / f"drop{drop}-int4"
    if not (ckpt / "tinyllm.json").exists():
        pruned = WORK / f"drop{drop}"
        run([*CLI, "prune", MODEL, "--method", "blocks", "--count", str(drop), "--samples",
             "16", "-o", str(pruned), "--overwrite"])  # fmt: skip
        flags = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--sym"]
        run([*CLI, "quantize", str(pruned), *flags, "--embed-bits", "8", "-o", str(ckpt)])
    return ckpt


def q4_0_gguf(model: str = MODEL) -> Path:
    path = WORK / ("int4-q4_0.gguf" if model == MODEL else f"{model}-int4-q4_0.gguf")
    if not path.exists():
        run([*CLI, "export", str(int4_checkpoint(model)), "--type", "q4_0", "-o", str(path)])
    return path


# --- decode ---------------------------------------------------------------------------------
def _engine_tps(engine, prompt: list[int], n: int) -> float:
    from tinyllm.runtime.sampling import SamplingParams

    seq = engine.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0]
    t = seq.token_times
    return (len(t) - 1) / (t[-1] - t[0])


def _hf_tps(model, prompt: list[int], n: int) -> float:
    import torch

    x = torch.tensor([prompt])
    t0 = time.perf_counter()
    model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    t1 = time.perf_counter()
    model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    t2 = time.perf_counter()
    return (n - 1) / ((t2 - t1) - (t1 - t0))  # decode only: minus the prefill-and-one-token run


def decode_row() -> dict:
    import torch

    import tinyllm
    from tinyllm.runtime.engine import Engine, EngineConfig

    torch.set_num_threads(THREADS)
    q, tok = tinyllm.load(int4_checkpoint())
    fp, _ = tinyllm.load(MODEL)
    eq = Engine(q, tok, EngineConfig(kv_memory_mb=32))
    ei = Engine(q, tok, EngineConfig(kv_memory_mb=32, int8_activations=True))
    ef = Engine(fp, tok, EngineConfig(kv_memory_mb=32))
    prompt = tok.encode("The history of the Roman Empire begins with")
    n, reps = 64, 5
    cases = {
        "engine_int4": lambda: _engine_tps(eq, prompt, n),
        "engine_int4_int8act": lambda: _engine_tps(ei, prompt, n),
        "hf_generate_int4": lambda: _hf_tps(q, prompt, n),
        "engine_fp32": lambda: _engine_tps(ef, prompt, n),
        "hf_generate_fp32": lambda: _hf_tps(fp, prompt, n),
    }
    for f in cases.values():
        f()  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):  # interleaved so drift hits every case alike
        for k, f in cases.items():
            samples[k].append(f())
    res = {k: statistics.median(v) for k, v in samples.items()}
    res["samples"] = samples
    bench = run([tool("llama-bench"), "-m", str(q4_0_gguf()), "-p", "0", "-n", str(n),
                 "-r", str(reps), "-t", str(THREADS)])  # fmt: skip
    tg = re.search(rf"tg{n}\s*\|\s*([0-9.]+)", bench)
    res["llama_cpp_q4_0"] = float(tg.group(1)) if tg else None
    res["command"] = "benchmarks/bench_runtime.py --rows decode"
    return res


# --- prefill ------------------------------------------------------------------------------
def prefill_row() -> dict:
    import torch

    import tinyllm
    from tinyllm.eval.evaluate import evaluation_windows
    from tinyllm.runtime.lm import RuntimeLM

    torch.set_num_threads(THREADS)
    q, tok = tinyllm.load(int4_checkpoint())
    windows, _ = evaluation_windows(tok, "enwiki", 512, 1)
    ids = windows[0].tolist()
    unpacked = RuntimeLM(q, tok)
    for ly in unpacked.runtime.layers:  # each module on its own: QuantLinear unpacks
        for f in (ly.qkv, ly.o, ly.gate_up, ly.down):
            f.group = None
    cases = {
        "engine_int4": RuntimeLM(q, tok),
        "engine_int4_int8act": RuntimeLM(q, tok, int8_act=True),
    }
    cases["unpacked_float_gemm"] = unpacked
    reps, samples = 5, {k: [] for k in cases}
    for lm in cases.values():
        lm.tail_logits([ids], [len(ids) - 1])  # warm-up
    for _ in range(reps):
        for k, lm in cases.items():
            t0 = time.perf_counter()
            lm.tail_logits([ids], [len(ids) - 1])
            samples[k].append(len(ids) / (time.perf_counter() - t0))
    res: dict = {k: statistics.median(v) for k, v in samples.items()}
    res["samples"] = samples
    bench = run([tool("llama-bench"), "-m", str(q4_0_gguf()), "-p", "512", "-n", "0",
                 "-r", str(reps), "-t", str(THREADS)])  # fmt: skip
    pp = re.search(r"pp512\s*\|\s*([0-9.]+)", bench)
    res["llama_cpp_q4_0_pp512"] = float(pp.group(1)) if pp else None
    res["command"] = "benchmarks/bench_runtime.py --rows prefill"
    return res


# --- HTTP streams ---------------------------------------------------------------------------
async def _stream_one(client, url: str, body: dict, headers: dict) -> dict:
    """One streaming completion: TTFT, token chunk times, status."""
    t0 = time.perf_counter()
    times: list[float] = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                retry = r.headers.get("retry-after")
                return {"status": r.status_code, "ttft": None, "tokens": 0, "times": [],
                        "retry_after": float(retry) if retry else None}  # fmt: skip
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    times.append(time.perf_counter())
    except Exception as e:  # a hang (timeout) or a dropped connection
        return {"status": type(e).__name__, "ttft": None, "tokens": len(times)}
    ttft = times[0] - t0 if times else None
    return {"status": 200, "ttft": ttft, "tokens": len(times), "times": times}


async def _drive(url: str, bodies: list[dict], concurrency: int, headers: dict,
                 on_done=None, retry: bool = False) -> list[dict]:  # fmt: skip
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(i: int, body: dict) -> dict:
            rejected = 0
            async with sem:
                res = await _stream_one(client, url, body, headers)
                while retry and res["status"] == 429 and rejected < 60:
                    rejected += 1  # honour Retry-After, then try again
                    await asyncio.sleep(res["retry_after"] or 1.0)
                    res = await _stream_one(client, url, body, headers)
                res["rejections"] = rejected
                if on_done:
                    on_done(i)
                return res

        return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))


class Server:
    """A server process on a port, waited for and killed on exit."""

    def __init__(self, cmd: list[str], health: str) -> None:
        self.cmd, self.health = cmd, health

    def __enter__(self) -> Server:
        import httpx

        print("$", " ".join(self.cmd), flush=True)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(600):
            try:
                if httpx.get(self.health, timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode()[-2000:])
            time.sleep(0.2)
        raise RuntimeError("server did not come up")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def rss_mib(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20


def _ours(port: int, *extra: str) -> Server:
    cmd = [*CLI, "serve", str(int4_checkpoint()), "--port", str(port), "--name", "m", *extra]
    return Server(cmd, f"http://127.0.0.1:{port}/health")


def _prompts(count: int, length: int) -> list[str]:
    import tinyllm
    from tinyllm.runtime.bench import bench_prompts

    _, tok = tinyllm.load(MODEL)
    return [tok.decode(p) for p in bench_prompts(tok, count, length)]


def _aggregate(results: list[dict], wall: float) -> float:
    return sum(r["tokens"] for r in results) / wall


def _rates(out: list[dict], wall: float) -> dict:
    """End-to-end tokens/s (from the first request sent) and decode-phase tokens/s, measured
    by the client from the arrival times of the streamed chunks (one per token)."""
    from tinyllm.runtime.bench import decode_rate

    return {"e2e": _aggregate(out, wall), "decode": decode_rate([r["times"] for r in out])}


def engine_levels(model: str = MODEL) -> dict:
    """The same 1 and 16 streams in-process (`tinyllm bench`), without HTTP."""
    import tinyllm
    from tinyllm.runtime.bench import bench
    from tinyllm.runtime.engine import Engine, EngineConfig
    from tinyllm.runtime.scheduler import SchedulerConfig

    q, tok = tinyllm.load(int4_checkpoint(model))
    res = {}
    for tag, i8 in (("engine", False), ("engine_i8", True)):
        cfg = EngineConfig(int8_activations=i8, scheduler=SchedulerConfig(max_batch=16))
        engine = Engine(q, tok, cfg)
        res["fallback"] = engine.fallback
        for r in bench(engine, [1, 16], 64, 64, repeats=3):
            res[f"{tag}_{r.concurrency}"] = {"e2e": r.tokens_per_s, "decode": r.decode_tokens_per_s}
    return res


SPECULATE_PROMPTS = {
    "extractive (repeat a sentence)": "Repeat the text exactly.\nText: The committee met on "
    "Tuesday to review the budget for the new library, the park renovation and the road "
    "repairs.\nRepeat: The committee met on Tuesday to review",
    "free text": "The history of the Roman Empire begins with",
}


def _speculation(ks: tuple[int, ...], draft: Path | None = None) -> dict:
    """Batch-1 greedy decode of the INT4 model on SPECULATE_PROMPTS, speculating K tokens (each
    of ks; by prompt lookup, or with `draft`'s model) against none, interleaved (5 runs each,
    the first dropped as warm-up): median tokens/s, equal outputs, drafts accepted."""
    import torch

    import tinyllm
    from tinyllm.runtime.engine import Engine, EngineConfig
    from tinyllm.runtime.sampling import SamplingParams

    torch.set_num_threads(THREADS)
    q, tok = tinyllm.load(int4_checkpoint())
    d = tinyllm.load(draft) if draft else None
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    res: dict = {}
    for name, text in SPECULATE_PROMPTS.items():
        ids = tok.encode(text)
        engines = {k: Engine(q, tok, EngineConfig(kv_memory_mb=64, speculate=k), d if k else None)
                   for k in (0, *ks)}  # fmt: skip
        tps: dict[int, list[float]] = {k: [] for k in engines}
        outputs = {}
        for _ in range(5):
            for k, e in engines.items():
                seq = e.generate([ids], params)[0]
                outputs[k] = seq.output
                tps[k].append(seq.decode_tokens_per_s)
        res[name] = {"plain": statistics.median(tps[0][1:])}
        for k in ks:
            m = engines[k].metrics
            res[name][f"speculate_{k}"] = statistics.median(tps[k][1:])
            res[name][f"identical_{k}"] = outputs[0] == outputs[k]
            res[name][f"accepted_{k}"] = [m.draft_accepted, m.draft_tokens]
    return res


def speculate_row() -> dict:
    """Prompt-lookup speculation, --speculate 4, against none."""
    res = _speculation((4,))
    for r in res.values():  # the keys of the table's earlier rows
        r["identical"] = r.pop("identical_4")
        r["accepted"], r["proposed"] = r.pop("accepted_4")
    return {**res, "command": "benchmarks/bench_runtime.py --rows speculate"}


DRAFT_DROP = 18  # of SmolLM2-135M's 30 blocks


def draft_row() -> dict:
    """A layer-dropped draft model, --speculate 2 and 4, against none."""
    res = _speculation((2, 4), draft_checkpoint(DRAFT_DROP))
    return {**res, "drop": DRAFT_DROP, "command": "benchmarks/bench_runtime.py --rows draft"}


def gemma_row() -> dict:
    """Gemma-3-270M INT4 (the Q4_0 grid, 8-bit embeddings) in the engine, in process: 1 and 16
    streams of 64 + 64 tokens; `llama-bench -n 64` on its Q4_0 export (the same integers)."""
    res = engine_levels(GEMMA)
    bench = run([tool("llama-bench"), "-m", str(q4_0_gguf(GEMMA)), "-p", "0", "-n", "64",
                 "-r", "5", "-t", str(THREADS)])  # fmt: skip
    tg = re.search(r"tg64\s*\|\s*([0-9.]+)", bench)
    res["llama_cpp_q4_0_tg64"] = float(tg.group(1)) if tg else None
    res["command"] = "benchmarks/bench_runtime.py --rows gemma"
    return res


def _step_allocations(engine, streams: int, prompt: list[int]) -> dict:
    """Tensor allocations and bytes of one steady-state decode step (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from tinyllm.runtime.sampling import SamplingParams

    for _ in range(streams):
        engine.submit(list(prompt), SamplingParams(max_tokens=64, ignore_eos=True))
    for _ in range(8):  # prefill, then decode: every buffer has its size
        engine.step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine.step()
    while engine.has_work():
        engine.step()
    events = [e for e in prof.events() if e.self_cpu_memory_usage > 0]
    return {"allocations": len(events), "bytes": sum(e.self_cpu_memory_usage for e in events)}


def static_row() -> dict:
    """Static memory: allocations per steady-state decode step and decode tokens/s at 1 and 16
    streams, the workspace (the default) against the allocating path (the same engine with its
    workspace removed), interleaved in one process; SmolLM2 and Gemma 3 INT4."""
    import torch

    import tinyllm
    from tinyllm.runtime.bench import bench
    from tinyllm.runtime.engine import Engine, EngineConfig
    from tinyllm.runtime.scheduler import SchedulerConfig

    torch.set_num_threads(THREADS)
    res = {"command": "benchmarks/bench_runtime.py --rows static"}
    for model in (MODEL, GEMMA):
        q, tok = tinyllm.load(int4_checkpoint(model))
        engine = Engine(q, tok, EngineConfig(scheduler=SchedulerConfig(max_batch=16)))
        ws, prompt = engine.runtime.ws, tok.encode("The history of the Roman Empire begins with")
        row: dict = {}
        for streams in (1, 16):
            for mode in ("static", "allocating"):
                engine.runtime.ws = ws if mode == "static" else None
                row[f"{mode}_{streams}"] = _step_allocations(engine, streams, prompt)
                row[f"{mode}_{streams}"]["decode"] = []
            for _ in range(3):  # interleaved repeats
                for mode in ("static", "allocating"):
                    engine.runtime.ws = ws if mode == "static" else None
                    r = bench(engine, [streams], 64, 64, repeats=1)[0]
                    row[f"{mode}_{streams}"]["decode"].append(r.decode_tokens_per_s)
        engine.runtime.ws = ws
        row["workspace_mib"] = ws.nbytes() / 2**20
        res[model] = row
    return res


def head_row() -> dict:
    """The verified int8 head of greedy exact-mode steps (runtime.model._verified_argmax_head)
    against the float head for every logit (the same engine with head_l1 removed): decode
    tokens/s at 1 and 16 streams, interleaved in one process, whether the tokens are identical,
    and how many logits per row the last step recomputed exactly; SmolLM2 and Gemma 3 INT4."""
    import torch

    import tinyllm
    from tinyllm.runtime.bench import bench, bench_prompts
    from tinyllm.runtime.engine import Engine, EngineConfig
    from tinyllm.runtime.sampling import SamplingParams
    from tinyllm.runtime.scheduler import SchedulerConfig

    torch.set_num_threads(THREADS)
    res = {"command": "benchmarks/bench_runtime.py --rows head"}
    for model in (MODEL, GEMMA):
        q, tok = tinyllm.load(int4_checkpoint(model))
        engine = Engine(q, tok, EngineConfig(scheduler=SchedulerConfig(max_batch=16)))
        l1 = engine.runtime.head_l1
        prompts = bench_prompts(tok, 16, 64)
        greedy = SamplingParams(max_tokens=64, ignore_eos=True)
        outputs, row = {}, {"vocab": engine.vocab_size}
        for mode in ("verified", "exact"):
            engine.runtime.head_l1 = l1 if mode == "verified" else None
            outputs[mode] = [s.output for s in engine.generate(prompts, greedy)]
            row[f"{mode}_1"], row[f"{mode}_16"] = [], []
        row["candidates_per_row"] = engine.runtime.argmax_candidates.float().mean().item()
        row["identical_tokens"] = outputs["verified"] == outputs["exact"]
        for _ in range(5):  # interleaved repeats
            for streams in (1, 16):
                for mode in ("verified", "exact"):
                    engine.runtime.head_l1 = l1 if mode == "verified" else None
                    r = bench(engine, [streams], 64, 64, repeats=1)[0]
                    row[f"{mode}_{streams}"].append(r.decode_tokens_per_s)
        res[model] = row
    return res


def streams_row() -> dict:
    env_threads = {"OMP_NUM_THREADS": str(THREADS)}
    os.environ.update(env_threads)
    prompts = _prompts(16, 64)
    res: dict = {"command": "benchmarks/bench_runtime.py --rows streams"}
    ours = {"model": "m", "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}
    for tag, extra in (("tinyllm", []), ("tinyllm_i8", ["--int8-act"])):
        with _ours(8311, "--max-batch", "16", *extra):
            url = "http://127.0.0.1:8311/v1/completions"
            for c in (1, 16):
                bodies = [{**ours, "prompt": p} for p in prompts[:c]]
                asyncio.run(_drive(url, bodies, c, {}))  # warm-up
                t0 = time.perf_counter()
                out = asyncio.run(_drive(url, bodies, c, {}))
                res[f"{tag}_{c}"] = _rates(out, time.perf_counter() - t0)
    llama = [tool("llama-server"), "-m", str(q4_0_gguf()), "--port", "8312", "-np", "16",
             "-c", str(16 * 192), "-t", str(THREADS), "-tb", str(THREADS)]  # fmt: skip
    with Server(llama, "http://127.0.0.1:8312/health"):
        url = "http://127.0.0.1:8312/completion"
        for c in (1, 16):
            bodies = [{"prompt": p, "n_predict": 64, "temperature": 0, "ignore_eos": True,
                       "stream": True, "cache_prompt": False} for p in prompts[:c]]  # fmt: skip
            asyncio.run(_drive(url, bodies, c, {}))
            t0 = time.perf_counter()
            out = asyncio.run(_drive(url, bodies, c, {}))
            res[f"llama_server_{c}"] = _rates(out, time.perf_counter() - t0)
    res.update(engine_levels())
    return res


def kv_row() -> dict:
    import tinyllm
    from tinyllm.runtime.engine import Engine, EngineConfig

    q, tok = tinyllm.load(int4_checkpoint())
    eng = Engine(q, tok, EngineConfig(kv_memory_mb=64))
    c = q.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    elem = eng.cache.k[0].element_size()  # the pool's dtype (float16 by default)
    theory = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * elem
    measured = eng.cache.pool_bytes() / (eng.cache.num_blocks * eng.cache.block_size)
    res = {"theory_bytes_per_token": theory, "pool_bytes_per_token": measured,
           "kv_dtype": str(eng.cache.k[0].dtype)}  # fmt: skip
    prompts = _prompts(500, 24)
    with _ours(8313, "--max-batch", "32", "--max-queue", "600") as srv:
        url = "http://127.0.0.1:8313/v1/completions"
        bodies = []
        for i, p in enumerate(prompts):
            drop = i % 5 == 4
            bodies.append({"model": "m", "prompt": p, "max_tokens": 200 if drop else 24,
                           "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": True,
                           "_drop": drop})  # fmt: skip
        out = asyncio.run(_drive_with_drops(url, bodies, 32))
        time.sleep(1.0)
        import httpx

        metrics = httpx.get("http://127.0.0.1:8313/metrics").text
        srv_rss = srv.rss_mib()
    used = int(re.search(r"^tinyllm_kv_blocks_used (\d+)", metrics, re.M).group(1))
    cancelled = re.search(r'tinyllm_finished_total\{reason="cancelled"\} (\d+)', metrics)
    res.update(
        requests=len(bodies), dropped=sum(b["_drop"] for b in bodies),
        completed=sum(r["status"] == 200 for r in out),
        cancelled_by_server=int(cancelled.group(1)) if cancelled else 0,
        blocks_in_use_after=used, server_rss_mib=srv_rss,
        command="benchmarks/bench_runtime.py --rows kv",
    )  # fmt: skip
    return res


async def _drive_with_drops(url: str, bodies: list[dict], concurrency: int) -> list[dict]:
    """Like _drive, but a request marked _drop closes its stream after 3 chunks."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(body: dict) -> dict:
            drop = body.pop("_drop")
            async with sem:
                if not drop:
                    return await _stream_one(client, url, body, {})
                async with client.stream("POST", url, json=body) as r:
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += line.startswith("data: ")
                        if seen >= 3:
                            break
                return {"status": "dropped", "tokens": seen}

        return await asyncio.gather(*(one(dict(b)) for b in bodies))


def _load_phase(srv: Server, url: str, bodies: list[dict], retry: bool) -> dict:
    from tinyllm.runtime.scheduler import percentile

    rss: list[float] = []

    def sample(i: int) -> None:
        if (i + 1) % 100 == 0:
            rss.append(srv.rss_mib())

    t0 = time.perf_counter()
    out = asyncio.run(_drive(url, bodies, 64, {}, on_done=sample, retry=retry))
    wall = time.perf_counter() - t0
    ok = [r for r in out if r["status"] == 200]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    after_warmup = rss[2:] if len(rss) > 2 else rss
    return {
        "requests": len(out), "completed": len(ok),
        "final_429": sum(r["status"] == 429 for r in out),
        "responses_429": sum(r["rejections"] for r in out) + sum(r["status"] == 429 for r in out),
        "other": sorted({str(r["status"]) for r in out} - {"200", "429"}),
        "wall_s": wall, "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
        "rss_mib_every_100": rss,
        "rss_growth_after_warmup_mib": max(after_warmup) - min(after_warmup) if rss else None,
    }  # fmt: skip


def load_row() -> dict:
    """1000 streaming requests, 64 at a time, against --max-queue 32: once where a 429 is final,
    once where each client honours Retry-After and tries again until it gets in."""
    prompts = _prompts(1000, 32)
    res: dict = {"command": "benchmarks/bench_runtime.py --rows load"}
    with _ours(8314, "--max-batch", "16", "--max-queue", "32") as srv:
        url = "http://127.0.0.1:8314/v1/completions"
        bodies = [{"model": "m", "prompt": p, "max_tokens": 16, "temperature": 0,
                   "ignore_eos": True, "stream": True} for p in prompts]  # fmt: skip
        res["no_retry"] = _load_phase(srv, url, bodies, retry=False)
        res["retry"] = _load_phase(srv, url, bodies, retry=True)
    return res


def throttle_row() -> dict:
    """48 streams at once against --max-batch 32, without and with --target-itl 60 (ms): the
    inter-token latency admitted streams see, and how many requests were turned away."""
    from tinyllm.runtime.scheduler import percentile

    prompts = _prompts(240, 32)
    res: dict = {"command": "benchmarks/bench_runtime.py --rows throttle"}
    for tag, extra in (("no_target", []), ("target_60ms", ["--target-itl", "60"])):
        with _ours(8315, "--max-batch", "32", "--max-queue", "64", *extra):
            url = "http://127.0.0.1:8315/v1/completions"
            bodies = [{"model": "m", "prompt": p, "max_tokens": 48, "temperature": 0,
                       "ignore_eos": True, "stream": True} for p in prompts]  # fmt: skip
            t0 = time.perf_counter()
            out = asyncio.run(_drive(url, bodies, 48, {}))
            wall = time.perf_counter() - t0
        ok = [r for r in out if r["status"] == 200]
        itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False)]
        res[tag] = {
            "completed": len(ok), "rejected_429": sum(r["status"] == 429 for r in out),
            "itl_p50_ms": 1000 * percentile(itl, 0.5), "itl_p95_ms": 1000 * percentile(itl, 0.95),
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        }  # fmt: skip
    return res


def run_row(name: str) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    rows = {"decode": decode_row, "prefill": prefill_row, "streams": streams_row, "kv": kv_row,
            "load": load_row, "throttle": throttle_row, "gemma": gemma_row,
            "speculate": speculate_row, "draft": draft_row, "static": static_row,
            "head": head_row}  # fmt: skip
    return rows[name]()


def table(results: dict) -> str:
    lines = []
    d = results.get("decode")
    if d:
        base = d["engine_int4"]
        lines += ["| batch-1 decode | tokens/s | tinyllm INT4 / this |", "|---|---|---|"]
        order = ["engine_int4", "engine_int4_int8act", "llama_cpp_q4_0", "hf_generate_int4",
                 "engine_fp32", "hf_generate_fp32"]  # fmt: skip
        for k in order:
            if d.get(k):
                lines.append(f"| {k} | {d[k]:.1f} | {base / d[k]:.2f} |")
        lines.append("")
    p = results.get("prefill")
    if p:
        ref = p["llama_cpp_q4_0_pp512"]
        lines += ["| prefill, 512-token prompt | tokens/s | x llama.cpp pp512 |", "|---|---|---|"]
        for k in ["engine_int4", "engine_int4_int8act", "unpacked_float_gemm"]:
            lines.append(f"| {k} | {p[k]:.1f} | {p[k] / ref:.2f} |")
        lines += [f"| llama_cpp_q4_0_pp512 | {ref:.1f} | 1.00 |", ""]
    sp = results.get("speculate")
    if sp:
        lines += ["| batch-1 decode, INT4 | plain tok/s | --speculate 4 tok/s | x plain | "
                  "identical | drafts accepted |", "|---|---|---|---|---|---|"]  # fmt: skip
        for name in SPECULATE_PROMPTS:
            r = sp[name]
            lines.append(
                f"| {name} | {r['plain']:.1f} | {r['speculate_4']:.1f} | "
                f"{r['speculate_4'] / r['plain']:.2f} | {r['identical']} | "
                f"{r['accepted']} of {r['proposed']} |"
            )
        lines.append("")
    dr = results.get("draft")
    if dr:
        lines += [f"| batch-1 decode, INT4, draft: {DRAFT_DROP} blocks dropped | plain tok/s | "
                  "k | tok/s | x plain | identical | drafts accepted |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name in SPECULATE_PROMPTS:
            r = dr[name]
            for k in (2, 4):
                a, n = r[f"accepted_{k}"]
                lines.append(
                    f"| {name} | {r['plain']:.1f} | {k} | {r[f'speculate_{k}']:.1f} | "
                    f"{r[f'speculate_{k}'] / r['plain']:.2f} | {r[f'identical_{k}']} | {a} of {n} |"
                )
        lines.append("")
    st = results.get("static")
    if st:
        lines += ["| static memory, INT4 | streams | allocations per decode step (bytes): "
                  "workspace | without | decode tok/s: workspace | without | x without |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for model in (MODEL, GEMMA):
            for n in (1, 16):
                a, b = st[model][f"static_{n}"], st[model][f"allocating_{n}"]
                ta, tb = statistics.median(a["decode"]), statistics.median(b["decode"])
                lines.append(
                    f"| {model} | {n} | {a['allocations']} ({a['bytes']}) | "
                    f"{b['allocations']} ({b['bytes']}) | {ta:.1f} | {tb:.1f} | {ta / tb:.2f} |"
                )
        lines.append("")
    hd = results.get("head")
    if hd:
        lines += ["| exact-mode head, INT4 | streams | decode tok/s: verified int8 head | float "
                  "head | x float | tokens identical | logits recomputed per row |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for model in (MODEL, GEMMA):
            r = hd[model]
            for n in (1, 16):
                ta, tb = statistics.median(r[f"verified_{n}"]), statistics.median(r[f"exact_{n}"])
                lines.append(
                    f"| {model} | {n} | {ta:.1f} | {tb:.1f} | {ta / tb:.2f} | "
                    f"{r['identical_tokens']} | {r['candidates_per_row']:.0f} of {r['vocab']} |"
                )
        lines.append("")
    g = results.get("gemma")
    if g:
        ref = g["llama_cpp_q4_0_tg64"]
        lines += ["| gemma3-270m INT4, in process | 1 stream decode tok/s | x llama.cpp tg64 | "
                  "16 streams decode tok/s | 16 / 1 |", "|---|---|---|---|---|"]  # fmt: skip
        for tag in ("engine", "engine_i8"):
            one, many = g[f"{tag}_1"]["decode"], g[f"{tag}_16"]["decode"]
            lines.append(f"| {tag} | {one:.1f} | {one / ref:.2f} | {many:.1f} | {many / one:.2f} |")
        lines += [f"| llama.cpp Q4_0 tg64 | {ref:.1f} | 1.00 | | |", ""]
    s = results.get("streams")
    if s:
        lines += [
            "| streams (64 prompt + 64 generated tokens each) | 1 stream decode tok/s | "
            "16 streams decode tok/s | 16 / 1 | 16 streams end-to-end tok/s |",
            "|---|---|---|---|---|",
        ]
        names = {
            "engine": "tinyllm engine, in process",
            "engine_i8": "tinyllm engine --int8-act, in process",
            "tinyllm": "tinyllm serve, HTTP",
            "tinyllm_i8": "tinyllm serve --int8-act, HTTP",
            "llama_server": "llama-server -np 16, HTTP",
        }
        for key, label in names.items():
            if f"{key}_1" in s:
                one, many = s[f"{key}_1"], s[f"{key}_16"]
                ratio = many["decode"] / one["decode"]
                lines.append(
                    f"| {label} | {one['decode']:.1f} | {many['decode']:.1f} | {ratio:.2f} | "
                    f"{many['e2e']:.1f} |"
                )
        lines.append("")
    k = results.get("kv")
    if k:
        lines.append(json.dumps(k))
    for key in ("load", "throttle"):
        if results.get(key):
            lines.append(json.dumps(results[key]))
    return "\n".join(lines)


if __name__ == "__main__":
    run_rows(OUT, row_args(ROWS), run_row, table)
