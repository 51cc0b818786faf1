"""The HTTP server over a live uvicorn on a free port, with a tiny model: the openai client,
streaming, metrics, tenants, bad input (each a 4xx in OpenAI's error shape) and a fuzz test."""

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import tiny_model, tiny_tokenizer
from tinyllm.runtime.engine import Engine, EngineConfig
from tinyllm.runtime.server import ServerLimits, TenantSpec, create_app

KEY_A, KEY_B = "sk-a", "sk-b"
AUTH = {"Authorization": f"Bearer {KEY_A}"}
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live(engine: Engine, keys=None, **kw) -> Iterator[str]:
    """A uvicorn server over create_app(engine, ...) on a free port; yields its base URL."""
    import uvicorn

    kw = {"max_body_bytes": 4096, "default_max_tokens": 16, **kw}
    app = create_app(engine, "tiny", keys, **kw)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    try:
        yield base
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def parts():
    """The tiny model and tokenizer (with a chat template), shared by every server here."""
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tiny_model("llama"), tok


def new_engine(parts) -> Engine:
    return Engine(*parts, EngineConfig(kv_memory_mb=2.0, block_size=4, kv_dtype="float32"))


@pytest.fixture(scope="module")
def server(parts):
    engine = new_engine(parts)
    keys = {KEY_A: TenantSpec("team-a"), KEY_B: TenantSpec("team-b", priority=1)}
    limits = ServerLimits(request_timeout=20.0, max_queue_wait=1.0)
    with live(engine, keys, limits=limits) as base:
        yield base, engine


def post(base: str, path: str, body, key: str | None = KEY_A, headers: dict | None = None,
         **kw) -> httpx.Response:  # fmt: skip
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    if isinstance(body, (dict, list)):
        return httpx.post(base + path, json=body, headers=headers, timeout=30, **kw)
    headers.setdefault("Content-Type", "application/json")
    return httpx.post(base + path, content=body, headers=headers, timeout=30, **kw)


def test_openai_client_completions_chat_and_streaming(server) -> None:
    from openai import OpenAI

    base, engine = server
    client = OpenAI(base_url=f"{base}/v1", api_key=KEY_A)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="The quick", max_tokens=8,
                                     temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt="The quick", max_tokens=8,
                  temperature=0, stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user",
        "content": "hi"}], max_tokens=6, temperature=0, stream=True)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content
    metrics = httpx.get(f"{base}/metrics", headers=AUTH).text
    assert "tinyllm_time_to_first_token_seconds_bucket" in metrics
    assert "tinyllm_inter_token_latency_seconds_count" in metrics
    assert 'tinyllm_queue_depth{tenant="team-a"} 0' in metrics
    assert "tinyllm_kv_blocks_used 0" in metrics or engine.running


def test_a_client_that_disconnects_frees_its_blocks(server) -> None:
    base, engine = server
    body = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 200, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{base}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY_A}"}) as r:  # fmt: skip
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    for _ in range(200):
        if engine.cache.used_blocks == 0 and not engine.running:
            break
        time.sleep(0.02)
    assert engine.cache.used_blocks == 0 and not engine.running
    assert engine.metrics.finishes["cancelled"] >= 1


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_input_gets_clear_4xx_errors(server) -> None:
    base, engine = server
    ok = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
    assert error_of(post(base, "/v1/completions", b"{not json"), 400)["code"] == "invalid_json"
    assert error_of(post(base, "/v1/completions", {"model": "tiny"}), 400)["param"] == "prompt"
    wrong = post(base, "/v1/completions", {**ok, "max_tokens": "many"})
    assert error_of(wrong, 400)["param"] == "max_tokens"
    assert error_of(post(base, "/v1/completions", {**ok, "max_tokens": 0}), 400)
    too_many = post(base, "/v1/completions", {**ok, "max_tokens": 10_000})
    assert error_of(too_many, 400)["code"] == "context_length_exceeded"
    long_prompt = post(base, "/v1/completions", {**ok, "prompt": "fox " * 400})
    assert error_of(long_prompt, 400)["code"] == "context_length_exceeded"
    assert (
        error_of(post(base, "/v1/completions", {**ok, "model": "gpt-9"}), 404)["param"] == "model"
    )
    assert error_of(post(base, "/v1/completions", ok, key="sk-wrong"), 401)["type"] == (
        "authentication_error"
    )
    assert error_of(post(base, "/v1/completions", ok, key=None), 401)
    assert error_of(post(base, "/v1/chat/completions", {"model": "tiny", "messages": []}), 400)
    big = {**ok, "prompt": "x" * 5000}
    assert error_of(post(base, "/v1/completions", big), 413)["code"] == "body_too_large"
    assert error_of(post(base, "/v1/completions", [1, 2]), 400)
    engine.scheduler.cfg.max_queue = 0  # a full queue: 429 with Retry-After
    try:
        busy = post(base, "/v1/completions", ok)
        assert error_of(busy, 429)["type"] == "rate_limit_error"
        assert int(busy.headers["retry-after"]) >= 1
    finally:
        engine.scheduler.cfg.max_queue = 256
    assert "tinyllm_rejections_total" in httpx.get(f"{base}/metrics", headers=AUTH).text
    assert post(base, "/v1/completions", ok).status_code == 200  # still alive


def wait_idle(engine: Engine, seconds: float = 5.0) -> None:
    """Wait until the engine holds no sequence and no KV block (or the time is up)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if engine.cache.used_blocks == 0 and not engine.running and not engine.scheduler.waiting:
            return
        time.sleep(0.02)


OK = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


def test_the_issue_requests_no_longer_kill_the_server_or_leak_internals(server) -> None:
    base, _ = server
    tiny_t = post(base, "/v1/completions", {**OK, "temperature": 1e-45, "ignore_eos": True})
    greedy = post(base, "/v1/completions", {**OK, "temperature": 0, "ignore_eos": True})
    assert (
        tiny_t.status_code == 200
        and tiny_t.json()["choices"][0]["text"] == (greedy.json()["choices"][0]["text"])
    )  # below the floor is greedy
    assert (
        error_of(post(base, "/v1/completions", {**OK, "repetition_penalty": 1e-300}), 400)["param"]
        == "repetition_penalty"
    )
    big = post(base, "/v1/completions", {**OK, "max_tokens": 2000000})
    assert error_of(big, 400)["code"] == "context_length_exceeded"
    assert "2000000" in big.json()["error"]["message"] and "Traceback" not in big.text
    seed = error_of(post(base, "/v1/completions", {**OK, "seed": 18446744073709551616}), 400)
    assert seed["param"] == "seed"
    assert (
        post(base, "/v1/completions", {**OK, "seed": 2**64 - 1, "temperature": 1}).status_code
        == 200
    )
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_logit_bias_steers_sampling_and_is_bounded(server) -> None:
    base, engine = server
    body = {**OK, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    forced = post(base, "/v1/completions", {**body, "logit_bias": {"77": 100}}).json()
    tok = engine.tokenizer
    assert forced["usage"]["completion_tokens"] == 5
    assert set(tok.encode(forced["choices"][0]["text"])) == {77}
    sampled = post(base, "/v1/completions", {**body, "temperature": 1.5, "seed": 3,
                                             "logit_bias": {"77": 100}}).json()  # fmt: skip
    assert set(tok.encode(sampled["choices"][0]["text"])) == {77}
    for bad, param in [({"77": 101}, "logit_bias"), ({"-1": 5}, "logit_bias"),
                       ({"x": 1}, "logit_bias"), ({"320": 1}, "logit_bias"),
                       ({str(i): 1 for i in range(301)}, "logit_bias")]:  # fmt: skip
        assert error_of(post(base, "/v1/completions", {**body, "logit_bias": bad}), 400)[
            "param"
        ].startswith(param), bad


def test_fields_json_and_headers_are_checked_at_the_boundary(server) -> None:
    base, _ = server
    path = "/v1/completions"
    assert error_of(post(base, path, {**OK, "stop": ["x"] * 17}), 400)["param"] == "stop"
    assert error_of(post(base, path, {**OK, "stop": "y" * 257}), 400)["param"] == "stop"
    for raw in (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}',
                b'{"model": "tiny", "prompt": "hi", "top_p": Infinity}',
                b'{"model": "tiny", "prompt": "hi", "temperature": 1e999}',
                        b"[" * 2000 + b"]" * 2000, b"\xff\xfe{}"):  # fmt: skip
        assert error_of(post(base, path, raw), 400)["code"] == "invalid_json", raw[:40]
    huge = b'{"model": "tiny", "prompt": "hi", "seed": ' + b"9" * 4000 + b"}"
    assert error_of(post(base, path, huge), 400)["param"] == "seed"
    deep: list = [1]
    for _ in range(40):
        deep = [deep]
    nested = {**OK, "extra": deep}
    assert "nested" in error_of(post(base, path, nested), 400)["message"]
    for value in ("NaN", "Infinity", "-Infinity"):
        assert error_of(post(base, path, {**OK, "temperature": value}), 400)["param"] == (
            "temperature"
        )
    raw = json.dumps(OK).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""):
        r = post(base, path, raw, headers={"Content-Type": ctype})
        assert error_of(r, 415)["code"] == "unsupported_media_type", ctype
    assert post(base, path, raw, headers={"Content-Type": "application/json; charset=utf-8"}
                ).status_code == 200  # fmt: skip
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example"):
        assert error_of(post(base, path, OK, headers={"Host": host}), 421)["code"] == (
            "host_not_allowed"
        )
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "10.1.2.3"):
        assert post(base, path, OK, headers={"Host": host}).status_code == 200, host


def test_chat_roles_and_template_errors_are_400(server, monkeypatch) -> None:
    base, engine = server
    path = "/v1/chat/completions"
    msg = {"model": "tiny", "max_tokens": 2}
    bad_role = post(base, path, {**msg, "messages": [{"role": "robot", "content": "hi"}]})
    assert error_of(bad_role, 400)["param"] == "messages.0.role"
    assert error_of(post(base, path, {**msg, "messages": [{"role": "user"}]}), 400)
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    assert post(base, path, {**msg, "messages": [{"role": "user", "content": parts}]}
                ).status_code == 200  # fmt: skip
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('users first') }}{% endif %}"
    monkeypatch.setattr(engine.tokenizer, "chat_template", strict + TEMPLATE)
    refused = post(base, path, {**msg, "messages": [{"role": "system", "content": "x"}]})
    err = error_of(refused, 400)
    assert err["code"] == "chat_template_error" and "users first" in err["message"]
    monkeypatch.setattr(engine.tokenizer, "chat_template", "{{ messages[0]['nope'].x() }}")
    assert error_of(post(base, path, {**msg, "messages": [{"role": "user", "content": "x"}]}),
                    400)["code"] == "chat_template_error"  # fmt: skip


def test_a_500_never_echoes_internal_text(server, monkeypatch) -> None:
    base, engine = server

    def broken(*_a, **_k):
        raise RuntimeError("secret internal detail /srv/key")

    monkeypatch.setattr(engine.tokenizer, "encode", broken)
    r = post(base, "/v1/completions", OK)
    assert r.status_code == 500 and "secret" not in r.text
    assert "request id" in r.json()["error"]["message"]


def test_nan_logits_end_only_that_request_with_an_error(server, monkeypatch) -> None:
    base, engine = server
    forward = engine.runtime.forward
    monkeypatch.setattr(engine.runtime, "forward",
                        lambda b, c: forward(b, c) * float("nan"))  # fmt: skip
    r = post(base, "/v1/completions", {**OK, "temperature": 0.7})
    err = error_of(r, 500)
    assert err["code"] == "generation_failed" and "non-finite" in err["message"]
    streamed = post(base, "/v1/completions", {**OK, "stream": True})  # fails before any text
    assert error_of(streamed, 500)["code"] == "generation_failed"
    calls = iter(range(10**6))  # from the fifth step on: the stream has begun, then fails
    monkeypatch.setattr(
        engine.runtime,
        "forward",
        lambda b, c: forward(b, c) * (1.0 if next(calls) < 4 else float("nan")),
    )
    body = {**OK, "stream": True, "ignore_eos": True, "max_tokens": 8, "temperature": 0}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=AUTH) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert json.loads(lines[0][6:])["choices"][0]["text"] is not None
    assert json.loads(lines[-2][6:])["error"]["code"] == "generation_failed"
    assert lines[-1] == "data: [DONE]"
    monkeypatch.setattr(engine.runtime, "forward", forward)
    assert post(base, "/v1/completions", OK).status_code == 200
    wait_idle(engine)
    assert engine.cache.used_blocks == 0 and engine.metrics.nonfinite_logits >= 3
    metrics = httpx.get(f"{base}/metrics", headers=AUTH).text
    assert "tinyllm_nonfinite_logits_total" in metrics
    assert "tinyllm_sampling_fallbacks_total" in metrics


def test_metrics_need_the_key_unless_public(server, parts) -> None:
    base, _ = server
    assert error_of(httpx.get(f"{base}/metrics"), 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/metrics", headers=AUTH).status_code == 200
    keys = {KEY_A: TenantSpec("a")}
    with live(new_engine(parts), keys, limits=ServerLimits(public_metrics=True)) as other:
        assert httpx.get(f"{other}/metrics").status_code == 200
    with live(new_engine(parts), keys, limits=ServerLimits(allowed_hosts=("llm.lan",))) as other:
        r = httpx.get(f"{other}/v1/models", headers={**AUTH, "Host": "llm.lan:80"})
        assert r.status_code == 200
        assert httpx.get(f"{other}/health", headers={"Host": "other.lan"}).status_code == 421


def test_queue_wait_is_bounded_and_the_request_leaves_the_queue(server) -> None:
    base, engine = server
    engine.scheduler.batch_cap = 0  # nothing is admitted: the request can only wait
    try:
        t0 = time.monotonic()
        r = post(base, "/v1/completions", OK)
        assert error_of(r, 429)["code"] == "queue_timeout"
        assert 1.0 <= time.monotonic() - t0 < 5 and int(r.headers["retry-after"]) >= 1
        wait_idle(engine, 2.0)
        assert engine.scheduler.waiting == 0
    finally:
        engine.scheduler.batch_cap = engine.scheduler.cfg.max_batch


def slowed(engine: Engine, seconds: float) -> Engine:
    forward = engine.runtime.forward

    def slow(batch, cache):
        time.sleep(seconds)
        return forward(batch, cache)

    engine.runtime.forward = slow
    return engine


def test_request_timeout_and_a_vanished_client_free_the_sequence(parts) -> None:
    engine = slowed(new_engine(parts), 0.05)
    long = {**OK, "max_tokens": 150, "ignore_eos": True}
    with live(engine, limits=ServerLimits(request_timeout=1.0)) as base:
        t0 = time.monotonic()
        r = post(base, "/v1/completions", long, key=None)
        assert error_of(r, 503)["code"] == "request_timeout" and r.headers["retry-after"]
        assert time.monotonic() - t0 < 3
        wait_idle(engine)
        assert engine.cache.used_blocks == 0
        with httpx.stream("POST", f"{base}/v1/completions", json={**long, "stream": True}) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_timeout"
        wait_idle(engine)
        assert engine.cache.used_blocks == 0
    engine = slowed(new_engine(parts), 0.05)
    with live(engine) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json=long, timeout=0.5)
        t0 = time.monotonic()
        while engine.metrics.finishes["cancelled"] < 1 and time.monotonic() - t0 < 3:
            time.sleep(0.02)
        assert time.monotonic() - t0 < 1.5  # cancelled within ~0.2 s of the disconnect
        wait_idle(engine)
        assert engine.cache.used_blocks == 0 and engine.metrics.finishes["length"] == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_or_stalled_engine_loop_answers_503(parts) -> None:
    engine = new_engine(parts)
    with live(engine, limits=ServerLimits(stall_seconds=0.5)) as base:
        slowed(engine, 2.0)  # one step takes 2 s: the loop stalls
        stuck = post(base, "/v1/completions", OK, key=None)
        assert error_of(stuck, 503)["code"] == "engine_unavailable"
        assert stuck.headers["retry-after"]
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and "no progress" in health.json()["reason"]
        time.sleep(2.0)
        assert httpx.get(f"{base}/health").status_code == 200  # the step ended: healthy again

        def die() -> bool:
            raise SystemExit("simulated loop failure")

        engine.has_work = die
        time.sleep(0.3)
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and "stopped" in health.json()["reason"]
        assert error_of(post(base, "/v1/completions", OK, key=None), 503)["code"] == (
            "engine_unavailable"
        )


FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "n",
          "stream", "seed", "messages", "repetition_penalty", "logit_bias", "ignore_eos", "user",
          "max_completion_tokens"]  # fmt: skip
EXTREMES = st.sampled_from(
    [1e-45, 5e-324, 1e-300, 1e308, -1e308, -0.0, 0.0, 1e-5, 2.0000001, float("nan"),
     float("inf"), float("-inf"), 2**63, 2**63 - 1, 2**64, 2**64 - 1, -(2**63), -1, 10**30,
     10**400, "NaN", "Infinity", "-Infinity", "-0.0", "1e-45", "", "tiny", "\x00", "\ud83d"]
)  # fmt: skip
ATOMS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.floats(-3, 3, allow_nan=False),
    EXTREMES, st.text(max_size=12), st.just("tiny"),
)  # fmt: skip
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "robot", "", 5]),
         "content": ATOMS | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                            "text": ATOMS}), max_size=2)}),
    max_size=3,
)  # fmt: skip
VALUES = st.recursive(
    ATOMS | MESSAGES | st.dictionaries(st.sampled_from(["5", "77", "-1", "320", "x"]), ATOMS,
                                       max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6,
)  # fmt: skip
CONTENT_TYPES = st.sampled_from(
    ["application/json"] * 6 + ["application/json; charset=utf-8", "text/plain", "",
     "application/x-www-form-urlencoded", "application/problem+json"]
)  # fmt: skip


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), VALUES, max_size=8),
       chat=st.booleans(), ctype=CONTENT_TYPES, base_ok=st.booleans())  # fmt: skip
def test_fuzzed_requests_never_get_a_5xx_and_leak_nothing(server, body, chat, ctype,
                                                          base_ok) -> None:  # fmt: skip
    base, engine = server
    if base_ok:  # half the examples start from a valid request, so generation runs too
        valid = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]} if chat else OK
        body = {**valid, **body}
    if isinstance(body.get("max_tokens"), int) and 8 < body["max_tokens"] < 10**6:
        body["max_tokens"] = 8  # keep generation short; extremes stay extreme
    raw = json.dumps(body).encode()  # float("nan") becomes a raw NaN token
    r = post(base, "/v1/chat/completions" if chat else "/v1/completions", raw,
             headers={"Content-Type": ctype})  # fmt: skip
    assert 200 <= r.status_code < 500, r.text
    event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics shows the mix
    if r.status_code >= 400:
        assert json.loads(r.text)["error"]["message"]
    assert httpx.get(f"{base}/health").status_code == 200
    wait_idle(engine, 2.0)  # a finished request has freed its blocks before it answered
    assert engine.cache.used_blocks == 0 and not engine.running and not engine.scheduler.waiting
