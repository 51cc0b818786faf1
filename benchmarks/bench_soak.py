"""Soak test of `tinyllm serve`: mixed traffic for a fixed time against one live server process.

Run: .venv/bin/python benchmarks/bench_soak.py [--duration 1200] [--concurrency 32] [--model M]
Traffic (seeded): 70% ordinary requests (completions and chat, streaming or not, 4-48 tokens,
sampled or greedy), 10% hostile ones (extreme or malformed values of every field, wrong
content types, bad JSON, deep nesting, huge stop lists, bad keys; see HOSTILE), 20% streams the
client drops after a few chunks. Every worker keeps one request in flight, so the server sees
`--concurrency` at once. Every 15 s the server's RSS and its /metrics (KV blocks in use) are
sampled; at the end the server must go idle with no KV block held.

Pass criteria (the issue's): the process never dies, no 5xx at all (a hostile request is a
client error: 4xx, or 200 where the value is legal), no ordinary request refused, zero KV blocks
in use once idle, RSS growth after warm-up under 2%: the median RSS over the last quarter of the
run against the median over 20-45% of it (the first 20% is warm-up; medians, so a transient
peak during a burst of long prefills is not read as growth; the peak is reported apart).
Results: benchmarks/results/soak_smollm2.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).parent
OUT = ROOT / "results" / "soak_smollm2.json"
CLI = [sys.executable, "-m", "tinyllm.cli"]
KEY = "sk-soak"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = [
    "The history of the city begins",
    "In mathematics, a group is",
    "Write one sentence about rivers.",
    "The quick brown fox",
    "Photosynthesis is the process by which",
    "List three colours:",
]


def _deep(n: int) -> bytes:
    """A body nested n objects deep (raw bytes: Python's own json cannot encode it)."""
    return b'{"model": "m", "prompt": "hi", "x": ' + b'{"a": ' * n + b"1" + b"}" * n + b"}"


def hostile(rng: random.Random) -> dict:
    """One hostile request: {'path', 'body' (JSON-able) or 'raw' (bytes), 'headers'}."""
    base = {"model": "m", "prompt": rng.choice(PROMPTS), "max_tokens": 8}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    cases: list[dict] = [
        {"body": {**base, "temperature": 1e-45}},
        {"body": {**base, "temperature": 1e-45, "top_p": 1e-45}},
        {"body": {**base, "repetition_penalty": 1e-300}},
        {"body": {**base, "repetition_penalty": 1e308}},
        {"body": {**base, "max_tokens": 2_000_000}},
        {"body": {**base, "max_tokens": -(2**63)}},
        {"body": {**base, "seed": 18446744073709551616}},
        {"body": {**base, "seed": -1}},
        {"body": {**base, "temperature": "NaN"}},
        {"body": {**base, "top_p": "Infinity"}},
        {"raw": b'{"model": "m", "prompt": "hi", "temperature": NaN}'},
        {"raw": b'{"model": "m", "prompt": "hi", "top_k": 1e999}'},
        {"body": {**base, "temperature": -0.0}},
        {"body": {**base, "top_k": 2**64}},
        {"body": {**base, "stop": ["a"] * 10_000}},
        {"body": {**base, "stop": "x" * 100_000}},
        {"body": {**base, "logit_bias": {"-1": 5}}},
        {"body": {**base, "logit_bias": {"1": 1e308}}},
        {"body": {**base, "logit_bias": {str(i): 1 for i in range(5000)}}},
        {"body": {**base, "prompt": ""}},
        {"raw": b'{"model": "m", "prompt": "\\u0000\\ud800", "max_tokens": 8}'},
        {"body": {**base, "prompt": "word " * 20_000}},
        {"raw": _deep(5000)},
        {"raw": b"[" * 100_000 + b"]" * 100_000},
        {"raw": b"\xff\xfe\x00garbage"},
        {"raw": json.dumps(base).encode(), "headers": {"Content-Type": "text/plain"}},
        {"raw": json.dumps(base).encode(), "headers": {"Content-Type": "application/x-www-form"}},
        {"body": {**chat, "messages": [{"role": "wizard", "content": "hi"}]}},
        {"body": {**chat, "messages": [{"role": "user", "content": ["not", "text"]}]}},
        {"body": {**chat, "messages": [{"role": "user"}]}},
        {"body": {**chat, "messages": [{"role": "user", "content": "{% raw %}"}] * 300}},
        {"body": base, "headers": {"Authorization": "Bearer wrong"}},
        {"body": base, "headers": {"Host": "evil.example"}},
        {"body": {**base, "n": 5}},
        {"body": {**base, "stream": "yes"}},
    ]
    case = dict(rng.choice(cases))
    case.setdefault("headers", {})
    chat_case = "messages" in case.get("body", {})
    case["path"] = "/v1/chat/completions" if chat_case else "/v1/completions"
    return case


def ordinary(rng: random.Random, stream: bool) -> dict:
    n = rng.randint(4, 48)
    sampled = rng.random() < 0.5
    extra = (
        {"temperature": 0.8, "top_p": 0.95, "seed": rng.randint(0, 2**31)}
        if sampled
        else {"temperature": 0}
    )
    if rng.random() < 0.5:
        body = {"model": "m", "prompt": rng.choice(PROMPTS), "max_tokens": n, **extra}
        path = "/v1/completions"
    else:
        msgs = [{"role": "user", "content": rng.choice(PROMPTS)}]
        body = {"model": "m", "messages": msgs, "max_tokens": n, **extra}
        path = "/v1/chat/completions"
    return {"path": path, "body": {**body, "stream": stream}, "headers": {}}


class Tally:
    def __init__(self) -> None:
        self.status: collections.Counter[str] = collections.Counter()
        self.five_xx: list[str] = []
        self.ordinary_refused: list[str] = []
        self.transport_errors: list[str] = []

    def note(self, kind: str, status: int | str, detail: str = "") -> None:
        self.status[f"{kind}:{status}"] += 1
        if status == "dropped":  # the client closed the stream, as planned
            return
        if isinstance(status, int) and status >= 500:
            self.five_xx.append(f"{kind} {status} {detail[:200]}")
        elif isinstance(status, int) and kind == "ordinary" and status != 200:
            self.ordinary_refused.append(f"{status} {detail[:200]}")
        elif not isinstance(status, int):
            self.transport_errors.append(f"{kind} {status} {detail[:200]}")


async def send(client: httpx.AsyncClient, url: str, req: dict, drop_after: int | None) -> tuple:
    headers = {**AUTH, **req["headers"]}
    if "raw" in req:
        headers.setdefault("Content-Type", "application/json")
        kw: dict = {"content": req["raw"]}
    else:
        kw = {"json": req["body"]}
    streaming = drop_after is not None or req.get("body", {}).get("stream") is True
    if not streaming:
        r = await client.post(url + req["path"], headers=headers, **kw)
        return r.status_code, r.text
    async with client.stream("POST", url + req["path"], headers=headers, **kw) as r:
        seen, text = 0, []
        async for line in r.aiter_lines():
            seen += line.startswith("data: ")
            text.append(line)
            if '"error"' in line:
                return 500, line  # an error event inside a 200 stream counts as a server fault
            if drop_after is not None and seen >= drop_after:
                return "dropped", ""
        return r.status_code, "\n".join(text)[-300:]


async def worker(wid: int, url: str, stop_at: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed * 1000 + wid)
    # as long as the server's own --request-timeout: a slow answer is not a fault
    async with httpx.AsyncClient(timeout=600) as client:
        while time.monotonic() < stop_at:
            u = rng.random()
            if u < 0.1:
                kind, req, drop = "hostile", hostile(rng), None
            elif u < 0.3:
                kind, req, drop = "disconnect", ordinary(rng, stream=True), rng.randint(1, 4)
                req["body"]["max_tokens"] = 48
            else:
                kind, req, drop = "ordinary", ordinary(rng, rng.random() < 0.5), None
            try:
                status, detail = await send(client, url, req, drop)
            except Exception as e:  # a transport error, or a fault of this client
                status, detail = type(e).__name__, str(e)
            tally.note(kind, status, detail)


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


async def sampler(url: str, proc: psutil.Process, stop_at: float, samples: list) -> None:
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as client:
        while time.monotonic() < stop_at:
            await asyncio.sleep(15)
            try:
                m = (await client.get(url + "/metrics", headers=AUTH)).text
                health = (await client.get(url + "/health")).status_code
            except httpx.HTTPError as e:
                m, health = "", type(e).__name__
            samples.append({
                "t": round(time.monotonic() - t0, 1),
                "rss_mib": proc.memory_info().rss / 2**20,
                "kv_blocks_used": metric(m, "tinyllm_kv_blocks_used"),
                "running": metric(m, "tinyllm_running_sequences"),
                "health": health,
            })  # fmt: skip


async def soak(url: str, proc: psutil.Process, args: argparse.Namespace) -> dict:
    tally, samples = Tally(), []
    stop_at = time.monotonic() + args.duration
    t0 = time.perf_counter()
    await asyncio.gather(
        sampler(url, proc, stop_at, samples),
        *(worker(i, url, stop_at, tally, args.seed) for i in range(args.concurrency)),
    )
    wall = time.perf_counter() - t0
    return {"tally": tally, "samples": samples, "wall_s": wall}


def idle_state(url: str) -> dict:
    """Wait until the server has nothing running, then read its KV blocks in use."""
    for _ in range(120):
        m = httpx.get(url + "/metrics", headers=AUTH, timeout=30).text
        if metric(m, "tinyllm_running_sequences") == 0:
            break
        time.sleep(0.5)
    fallbacks = re.findall(r"^tinyllm_\w*(?:fallback|nonfinite)\w*(?:\{[^}]*\})? (\S+)$", m, re.M)
    return {
        "kv_blocks_used": metric(m, "tinyllm_kv_blocks_used"),
        "running": metric(m, "tinyllm_running_sequences"),
        "generated_tokens": metric(m, "tinyllm_generated_tokens_total"),
        "nonfinite_or_fallback_counters": fallbacks,
        "health": httpx.get(url + "/health", timeout=30).status_code,
    }


def rss_windows(samples: list[dict], duration: float) -> tuple[float | None, float | None]:
    """Median RSS just after warm-up (20-45% of the run) and over the last quarter: medians, so
    a transient peak (a burst of long prefills) is not read as growth; peaks are kept apart."""
    import statistics

    def median(lo: float, hi: float) -> float | None:
        xs = [s["rss_mib"] for s in samples if lo * duration <= s["t"] < hi * duration]
        return statistics.median(xs) if xs else None

    return median(0.2, 0.45), median(0.75, 1.01)


def summarize(res: dict, idle: dict, alive: bool, args: argparse.Namespace) -> dict:
    tally, samples = res["tally"], res["samples"]
    base, last = rss_windows(samples, args.duration)
    growth = (last - base) / base if base and last else None
    total = sum(tally.status.values())
    return {
        "command": (f"benchmarks/bench_soak.py --duration {args.duration} "
                    f"--concurrency {args.concurrency} --model {args.model}"),
        "model": args.model, "duration_s": args.duration, "concurrency": args.concurrency,
        "wall_s": round(res["wall_s"], 1), "requests": total,
        "by_kind_and_status": dict(sorted(tally.status.items())),
        "server_alive": alive, "five_xx": len(tally.five_xx),
        "five_xx_examples": tally.five_xx[:10],
        "ordinary_refused": len(tally.ordinary_refused),
        "ordinary_refused_examples": tally.ordinary_refused[:10],
        "transport_errors": len(tally.transport_errors),
        "transport_error_examples": tally.transport_errors[:10],
        "idle": idle, "rss_mib_after_warmup": base, "rss_mib_end": last,
        "rss_growth_after_warmup": growth,
        "rss_mib_peak": max((s["rss_mib"] for s in samples), default=None), "samples": samples,
    }  # fmt: skip


def resummarize(path: Path) -> None:
    """Recompute the derived fields of a saved result (RSS windows and peak) from its samples."""
    out = json.loads(path.read_text())
    base, last = rss_windows(out["samples"], out["duration_s"])
    out["rss_mib_after_warmup"], out["rss_mib_end"] = base, last
    out["rss_growth_after_warmup"] = (last - base) / base if base and last else None
    out["rss_mib_peak"] = max((s["rss_mib"] for s in out["samples"]), default=None)
    out["transport_errors"] = sum(
        n for k, n in out["by_kind_and_status"].items()
        if not k.split(":")[1].isdigit() and k.split(":")[1] != "dropped"
    )  # fmt: skip
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("rss_growth_after_warmup", "rss_mib_peak",
                                          "transport_errors")}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=1200.0, help="seconds of traffic")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--port", type=int, default=8377)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--resummarize", type=Path, help="recompute a saved result's RSS summary")
    args = ap.parse_args()
    if args.resummarize:
        resummarize(args.resummarize)
        return
    cmd = [*CLI, "serve", args.model, "--port", str(args.port), "--name", "m", "--api-key", KEY]
    print("$", " ".join(cmd), flush=True)
    import subprocess

    log = open(args.out.with_suffix(".server.log"), "w")  # noqa: SIM115
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(900):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"server exited; see {log.name}")
            time.sleep(0.2)
        res = asyncio.run(soak(url, psutil.Process(server.pid), args))
        alive = server.poll() is None
        idle = idle_state(url) if alive else {}
    finally:
        server.terminate()
        server.wait(timeout=60)
    out = summarize(res, idle, alive, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(args.out)
    keys = ["requests", "server_alive", "five_xx", "ordinary_refused", "transport_errors",
            "rss_growth_after_warmup"]  # fmt: skip
    print(json.dumps({k: out[k] for k in keys} | {"idle": out["idle"]}, indent=2))


if __name__ == "__main__":
    main()
