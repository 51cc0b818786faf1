"""The HTTP server over a live uvicorn on a free port, with a tiny model: the openai client,
streaming, metrics, tenants, bad input (each a 4xx in OpenAI's error shape) and a fuzz test."""

import json
import socket
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import tiny_model, tiny_tokenizer
from tinyllm.runtime.engine import Engine, EngineConfig
from tinyllm.runtime.server import TenantSpec, create_app

KEY_A, KEY_B = "sk-a", "sk-b"
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import uvicorn

    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    engine = Engine(
        tiny_model("llama"), tok, EngineConfig(kv_memory_mb=2.0, block_size=4, kv_dtype="float32")
    )
    keys = {KEY_A: TenantSpec("team-a"), KEY_B: TenantSpec("team-b", priority=1)}
    app = create_app(engine, "tiny", keys, max_body_bytes=4096, default_max_tokens=16)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield base, engine
    srv.should_exit = True
    thread.join(timeout=10)


def post(base: str, path: str, body, key: str | None = KEY_A, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(base + path, json=body, headers=headers, timeout=30, **kw)
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
    metrics = httpx.get(f"{base}/metrics").text
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
    assert "tinyllm_rejections_total" in httpx.get(f"{base}/metrics").text
    assert post(base, "/v1/completions", ok).status_code == 200  # still alive


FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "n",
          "stream", "seed", "messages", "repetition_penalty"]  # fmt: skip
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.floats(-3, 3, allow_nan=False),
    st.text(max_size=12), st.lists(st.text(max_size=5), max_size=3), st.just("tiny"),
    st.just([{"role": "user", "content": "hi"}]),
)  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), VALUES, max_size=8),
       chat=st.booleans())  # fmt: skip
def test_fuzzed_requests_never_get_a_500(server, body, chat) -> None:
    base, _ = server
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 8)
    r = post(base, "/v1/chat/completions" if chat else "/v1/completions", body)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert json.loads(r.text)["error"]["message"]
