"""OpenAI-compatible HTTP server over the engine (FastAPI; run by uvicorn from `tinyllm serve`).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events), GET /v1/models, /health, /metrics (Prometheus text). Every error, the
user's or ours, is a JSON body in OpenAI's shape `{"error": {"message", "type", "param",
"code"}}`; bad input is a 4xx, never a 500, and a 500 never carries exception text.

Every field is bounded at the boundary (`_Common`, `loads_limited`, the Content-Type and Host
checks), tokenization runs on a tokenizer thread, and each request waits for its events through
a `_Watch` that enforces its deadline and queue wait, notices a client that went away (its
sequence is cancelled and its KV blocks freed at the next step) and answers 503 while the engine
loop is dead or stalled. Limits and codes: docs/runtime.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyllm.errors import ConfigError
from tinyllm.runtime.engine import Engine, EngineLoop, Event
from tinyllm.runtime.sampling import (
    MAX_LOGIT_BIAS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MAX_TOKENS_LIMIT,
    SEED_MAX,
    SamplingParams,
)
from tinyllm.runtime.scheduler import QueueFull
from tinyllm.util.energy import EnergyMeter

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class TenantSpec:
    name: str
    weight: float = 1.0
    priority: int = 0
    max_concurrency: int | None = None
    max_queue: int | None = None


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers or {}


def error_response(e: APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


class _Common(BaseModel):
    """Fields both endpoints share. Unknown OpenAI fields are accepted and ignored; known ones
    are bounded here, so nothing out of range reaches the engine."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(..., max_length=256)
    max_tokens: int | None = Field(None, ge=1)  # at most the context: checked against the prompt
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    n: Literal[1] = 1
    stream: StrictBool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    user: str | None = Field(None, max_length=256)
    ignore_eos: StrictBool = False  # an extension (as in vLLM): generate max_tokens whatever comes
    logit_bias: dict[int, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(len(x) > MAX_STOP_CHARS for x in stops):
            raise ValueError(f"each stop string must be at most {MAX_STOP_CHARS} characters")
        return [x for x in stops if x]

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop or [],
            ignore_eos=self.ignore_eos,
            logit_bias=self.logit_bias or {},
        )


class CompletionRequest(_Common):
    prompt: str = Field(..., min_length=1)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return {"role": self.role, "content": text}


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on time, size and who may connect (`tinyllm serve` options; defaults here)."""

    request_timeout: float = 600.0  # seconds from arrival to the last token (--request-timeout)
    max_queue_wait: float = 120.0  # seconds a request may wait for admission (--max-queue-wait)
    max_json_depth: int = 32  # nesting of the request body
    bind_host: str = "127.0.0.1"  # with localhost and allowed_hosts, what Host may name
    allowed_hosts: tuple[str, ...] = ()  # --allowed-host; "*" allows any
    public_metrics: bool = False  # /metrics without a key even when keys are set
    stall_seconds: float = 60.0  # an engine loop silent this long with work is unhealthy


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is answered 413 before it is parsed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Any) -> None:
        e = APIError(413, f"request body is larger than {self.limit} bytes", code="body_too_large")
        resp = error_response(e)
        await send({"type": "http.response.start", "status": 413, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})


class _TooLarge(Exception):
    pass


class HostCheck:
    """ASGI middleware against DNS rebinding: a request whose Host header names a host this
    server does not answer to (not an IP literal, localhost, the bind host or an allowed host)
    gets 421 before anything else runs. A rebinding page reaches the server through a domain
    name it controls, so IP literals are safe to accept."""

    def __init__(self, app: Any, allowed: set[str]) -> None:
        self.app, self.allowed = app, {h.lower().rstrip(".") for h in allowed}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw = dict(scope.get("headers") or []).get(b"host")
            if raw is not None and not host_allowed(raw.decode("latin-1"), self.allowed):
                e = APIError(
                    421,
                    "this server does not answer to the host named in the Host header; start "
                    "it with --allowed-host NAME to allow that name",
                    code="host_not_allowed",
                )
                resp = error_response(e)
                await send({"type": "http.response.start", "status": 421,
                            "headers": resp.raw_headers})  # fmt: skip
                await send({"type": "http.response.body", "body": resp.body})
                return
        await self.app(scope, receive, send)


def host_allowed(header: str, allowed: set[str]) -> bool:
    """Whether a Host header value ('name', 'name:port', '[v6]:port') may be served."""
    value = header.strip().lower()
    if value.startswith("["):
        name = value[1 : value.find("]")] if "]" in value else value
    else:
        name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    name = name.rstrip(".")
    if "*" in allowed or name in allowed or name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys: dict[str, TenantSpec] | None, insecure: bool) -> None:
    """Refuse to serve beyond loopback without API keys, unless `insecure` (then warn)."""
    if keys or is_loopback(host):
        return
    if not insecure:
        raise ConfigError(
            f"binding {host} exposes the server beyond this machine, and no API key is set: "
            "give --api-key/--api-key-file/--tenants (or TINYLLM_API_KEYS), or pass --insecure "
            "to serve without auth anyway"
        )
    log.warning("serving on %s with no API keys: anyone who can reach it can use it", host)


def create_app(
    engine: Engine,
    model_name: str,
    api_keys: dict[str, TenantSpec] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    default_max_tokens: int = 256,
    engine_loop: EngineLoop | None = None,
    limits: ServerLimits | None = None,
) -> FastAPI:
    """The app. Without `engine_loop`, an engine loop thread starts and stops with the app;
    `serve()` passes one it runs on the main thread instead (faster kernels, see EngineLoop)."""
    limits = limits or ServerLimits()
    loop_holder: dict[str, EngineLoop] = {}
    if engine_loop is not None:
        loop_holder["loop"] = engine_loop
    # one tokenizer thread: tokenization and chat templates stay off the event loop, and the
    # fast tokenizer is never entered by two encodes at once
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tinyllm-tokenize")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        own = engine_loop is None
        engine.metrics.start_energy(EnergyMeter([engine.device]))  # /metrics: joules since now
        if own:
            loop_holder["loop"] = EngineLoop(engine, limits.stall_seconds).start()
        yield
        if own:
            loop_holder["loop"].stop()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tinyllm", lifespan=lifespan, docs_url=None, redoc_url=None)
    for spec in (api_keys or {}).values():
        engine.scheduler.tenant(
            spec.name,
            weight=spec.weight,
            priority=spec.priority,
            max_concurrency=spec.max_concurrency,
            max_queue=spec.max_queue,
        )
    ctx = _Ctx(engine, model_name, api_keys, default_max_tokens, loop_holder, limits, pool)
    _handlers(app, engine)
    _routes(app, ctx)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    allowed = {"localhost", limits.bind_host, *limits.allowed_hosts} - {"0.0.0.0", "::", ""}
    app.add_middleware(HostCheck, allowed=allowed)
    return app


@dataclass
class _Ctx:
    engine: Engine
    model_name: str
    api_keys: dict[str, TenantSpec] | None
    default_max_tokens: int
    loops: dict[str, EngineLoop]
    limits: ServerLimits
    pool: concurrent.futures.ThreadPoolExecutor

    def tenant(self, request: Request) -> str:
        if not self.api_keys:
            return "default"
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not key:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )
        # constant-time comparison: response timing does not leak how much of a key matched
        spec = next(
            (v for k, v in self.api_keys.items() if hmac.compare_digest(k.encode(), key.encode())),
            None,
        )
        if spec is None:
            raise APIError(401, "incorrect API key", "authentication_error", code="invalid_api_key")
        return spec.name

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server has "
                f"'{self.model_name}' (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def problem(self) -> str | None:
        loop = self.loops.get("loop")
        return loop.problem() if loop is not None else None

    def check_ready(self) -> None:
        """503 with Retry-After while the engine loop is dead or stalled."""
        problem = self.problem()
        if problem:
            raise APIError(
                503,
                f"the engine is unavailable ({problem}); retry later",
                "server_error",
                code="engine_unavailable",
                headers={"Retry-After": "30"},
            )

    def wake(self) -> None:
        loop = self.loops.get("loop")
        if loop is not None:
            loop.wake()

    async def offload(self, deadline: float, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the tokenizer thread, within the request's deadline."""
        future = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        try:
            return await asyncio.wait_for(future, timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise _timeout(self.limits.request_timeout) from None


def _timeout(seconds: float) -> APIError:
    return APIError(
        503,
        f"the request did not finish within the server's request timeout ({seconds:g} s)",
        "server_error",
        code="request_timeout",
        headers={"Retry-After": "10"},
    )


def _handlers(app: FastAPI, engine: Engine) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        if e.status in (429, 503):
            engine.metrics.rejected(e.code or "rejected")
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(APIError(e.status_code, str(e.detail), type_))

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:
        rid = uuid.uuid4().hex[:16]
        log.error("unhandled error (request id %s)", rid, exc_info=e)
        msg = f"internal server error (request id {rid}; the server log has the details)"
        return error_response(APIError(500, msg, "server_error", code="internal_error"))


def _validation_error(errors: Any) -> APIError:
    first = next(iter(errors), {})
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "the body is not valid JSON", code="invalid_json")
    param = ".".join(loc) or None
    where = f"'{param}': " if param else ""
    return APIError(
        400, f"{where}{first.get('msg', 'invalid request')}", param=param, code="invalid_value"
    )


def _routes(app: FastAPI, ctx: _Ctx) -> None:
    engine = ctx.engine

    @app.get("/health")
    async def health() -> JSONResponse:
        problem = ctx.problem()
        if problem:
            body = {"status": "unavailable", "reason": problem, "model": ctx.model_name}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "30"})
        return JSONResponse({"status": "ok", "model": ctx.model_name})

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        if not ctx.limits.public_metrics:
            ctx.tenant(request)
        body = engine.metrics.render(len(engine.running))
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        ctx.tenant(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": ctx.model_name,
                    "object": "model",
                    "created": int(engine.metrics.started),
                    "owned_by": "tinyllm",
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        deadline, tenant, body = await _admit(request, ctx, CompletionRequest)
        prompt = await ctx.offload(deadline, engine.tokenizer.encode, body.prompt)
        return await _serve(request, ctx, tenant, body, prompt, deadline, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        deadline, tenant, body = await _admit(request, ctx, ChatRequest)
        messages = [m.as_dict() for m in body.messages]
        prompt = await ctx.offload(deadline, _chat_prompt, engine, messages)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        return await _serve(request, ctx, tenant, body, prompt, deadline, chat=True)


def _chat_prompt(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    """Token ids through the chat template; a template that refuses the messages is a 400."""
    try:
        return engine.chat_ids(messages)
    except ConfigError as e:
        raise APIError(400, str(e), param="messages", code="no_chat_template") from None
    except Exception as e:
        import jinja2

        if isinstance(e, jinja2.TemplateError):
            msg = f"the chat template refused these messages: {e}"
        else:
            log.warning("chat template failed on a request", exc_info=True)
            msg = "the chat template could not render these messages (roles or content)"
        raise APIError(400, msg, param="messages", code="chat_template_error") from None


def _content_type_ok(value: str) -> bool:
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and
                                            media.endswith("+json"))  # fmt: skip


async def _admit(request: Request, ctx: _Ctx, kind: type[_Common]) -> tuple[float, str, Any]:
    """A generation request let in: (its deadline, its tenant, its body parsed as `kind`), once
    the key, the body, the model name and the engine's readiness were checked (in that order)."""
    deadline = time.monotonic() + ctx.limits.request_timeout
    tenant = ctx.tenant(request)
    body = _parse(await _json(request, ctx.limits.max_json_depth), kind)
    ctx.check_model(body.model)
    ctx.check_ready()
    return deadline, tenant, body


async def _json(request: Request, max_depth: int) -> Any:
    if not _content_type_ok(request.headers.get("content-type", "")):
        raise APIError(
            415,
            "the body must be JSON: send 'Content-Type: application/json'",
            code="unsupported_media_type",
        )
    return loads_limited(await request.body(), max_depth)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:32]} is out of range")
    return value


def loads_limited(raw: bytes, max_depth: int) -> Any:
    """json.loads that refuses NaN/Infinity, numbers out of float range, integers over Python's
    digit limit and nesting deeper than max_depth, each as a 400."""
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        data = None
        max_depth = -1
    except ValueError as e:  # NaN/Infinity, huge numbers, bad UTF-8
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if max_depth < 0 or _depth_exceeds(data, max_depth):
        raise APIError(
            400, f"the body is nested deeper than {max(max_depth, 0) or 'allowed'} levels",
            code="invalid_json",
        )  # fmt: skip
    return data


def _depth_exceeds(data: Any, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((c, depth + 1) for c in children)
    return False


def _parse(data: Any, cls: type[BaseModel]) -> Any:
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_value")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _params(ctx: _Ctx, body: _Common, prompt: list[int]) -> SamplingParams:
    """The request's sampling parameters, with max_tokens checked against the context."""
    engine = ctx.engine
    room = engine.max_context - len(prompt)
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {len(prompt)} tokens; this model's context holds {engine.max_context}",
            param="prompt",
            code="context_length_exceeded",
        )
    if body.max_tokens is not None and body.max_tokens > room:
        raise APIError(
            400,
            f"prompt ({len(prompt)} tokens) + max_tokens ({body.max_tokens}) exceeds the "
            f"context this server holds ({engine.max_context} tokens): ask for at most {room}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    vocab = engine.vocab_size
    if vocab and (bad := [t for t in body.logit_bias or {} if t >= vocab]):
        raise APIError(
            400,
            f"logit_bias names token id {bad[0]}; this model's ids run from 0 to {vocab - 1}",
            param="logit_bias",
            code="invalid_value",
        )
    try:
        return body.sampling(body.max_tokens or min(ctx.default_max_tokens, room))
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _submit(ctx: _Ctx, tenant: str, body: _Common, prompt: list[int], sink: Any) -> Any:
    engine = ctx.engine
    params = _params(ctx, body, prompt)
    try:
        seq = engine.submit(prompt, params, sink=sink, tenant=tenant)
    except ConfigError as e:
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    except QueueFull as e:
        raise APIError(
            429,
            f"server busy: {e}; retry after {e.retry_after} s",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after)},
        ) from None
    ctx.wake()
    return seq


@dataclass
class _Watch:
    """What a request waits with: its events, its deadline, and when it last looked around."""

    ctx: _Ctx
    request: Request
    seq: Any
    queue: asyncio.Queue
    deadline: float
    arrival: float
    rid: str
    checked: float = 0.0

    async def next(self, poll_disconnect: bool) -> Event:
        """The sequence's next event. Every 0.2 s (between events or while they keep coming)
        it checks the client, the engine's health, the deadline and the queue wait, raising
        APIError (or _Gone when the client left)."""
        while True:
            try:
                ev = await asyncio.wait_for(self.queue.get(), timeout=0.2)
            except TimeoutError:
                ev = None
            now = time.monotonic()
            if ev is not None and ev.finish_reason is not None:
                return ev
            if now - self.checked >= 0.2:
                self.checked = now
                await self._check(now, poll_disconnect)
            if ev is not None:
                return ev

    async def _check(self, now: float, poll_disconnect: bool) -> None:
        if poll_disconnect and await self.request.is_disconnected():
            raise _Gone
        self.ctx.check_ready()
        if now > self.deadline:
            raise _timeout(self.ctx.limits.request_timeout)
        waited = now - self.arrival
        if self.seq.admitted is None and waited > self.ctx.limits.max_queue_wait:
            retry = self.ctx.engine.scheduler.retry_after()
            raise APIError(
                429,
                f"the request waited {waited:.0f} s in the queue (the server's limit is "
                f"{self.ctx.limits.max_queue_wait:g} s) without starting; retry after {retry} s",
                "rate_limit_error",
                code="queue_timeout",
                headers={"Retry-After": str(retry)},
            )

    def cancel(self) -> None:
        if self.seq.finish_reason is None:
            self.ctx.engine.cancel(self.seq.id)
            self.ctx.wake()


class _Gone(Exception):
    """The client disconnected."""


def _failed(ev: Event, rid: str) -> APIError:
    return APIError(
        500,
        f"generation failed: {ev.error} (request id {rid})",
        "server_error",
        code="generation_failed",
    )


async def _serve(
    request: Request,
    ctx: _Ctx,
    tenant: str,
    body: _Common,
    prompt: list[int],
    deadline: float,
    chat: bool,
) -> Any:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    seq = _submit(
        ctx, tenant, body, prompt, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
    )
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    watch = _Watch(ctx, request, seq, queue, deadline, time.monotonic(), rid)
    done = False
    try:
        # the first event (first text, or the end) before any header: an error up to then,
        # queue timeouts included, gets its own status code, streaming or not
        first = await watch.next(poll_disconnect=True)
        if first.error:
            raise _failed(first, rid)
        if body.stream:
            done = True  # the stream owns the sequence from here
            gen = _stream(watch, first, body.model, chat)
            return StreamingResponse(gen, media_type="text/event-stream")
        text, ev = [first.text], first
        while ev.finish_reason is None:
            ev = await watch.next(poll_disconnect=True)
            if ev.error:
                raise _failed(ev, rid)
            text.append(ev.text)
        done = True
        return _completion(seq, "".join(text), ev.finish_reason, rid, body.model, chat)
    except _Gone:
        return JSONResponse({}, status_code=499)
    finally:
        if not done:
            watch.cancel()


def _completion(seq: Any, content: str, reason: str | None, rid: str, model: str,
                chat: bool) -> dict:  # fmt: skip
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": content}
    else:
        choice["text"] = content
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(seq),
    }


def _usage(seq: Any) -> dict[str, int]:
    return {
        "prompt_tokens": len(seq.prompt),
        "completion_tokens": len(seq.output),
        "total_tokens": len(seq.prompt) + len(seq.output),
    }


async def _stream(watch: _Watch, first: Event, model: str, chat: bool) -> AsyncIterator[str]:
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {
                "index": 0,
                "delta": delta if (text or first) else {},
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        data = {"id": watch.rid, "object": obj, "created": created, "model": model,
                "choices": [choice]}  # fmt: skip
        return f"data: {json.dumps(data)}\n\n"

    try:
        if chat:
            yield chunk("", None, first=True)
        ev: Event | None = first
        while ev is not None:
            if ev.error:
                yield _sse_error(_failed(ev, watch.rid))
                break
            if ev.text or ev.finish_reason:
                yield chunk(ev.text, ev.finish_reason)
            if ev.finish_reason:
                break
            try:
                ev = await watch.next(poll_disconnect=False)
            except APIError as e:  # deadline or engine failure mid-stream
                yield _sse_error(e)
                break
        yield "data: [DONE]\n\n"
    finally:  # normal end, error, or the client went away (the task is cancelled)
        watch.cancel()


def _sse_error(e: APIError) -> str:
    err = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return f"data: {json.dumps(err)}\n\n"


class TenantEntry(BaseModel):
    """One tenant in a --tenants file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: StrictStr = Field(..., min_length=1, max_length=64)
    key: StrictStr = Field(..., min_length=1, max_length=512, pattern=r"^\S+$")
    weight: float = Field(1.0, gt=0.0, le=1e6)
    priority: StrictInt = Field(0, ge=-1000, le=1000)
    max_concurrency: StrictInt | None = Field(None, ge=1)
    max_queue: StrictInt | None = Field(None, ge=1)


class TenantFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: list[TenantEntry] = Field(..., min_length=1)

    @field_validator("tenants")
    @classmethod
    def _unique(cls, tenants: list[TenantEntry]) -> list[TenantEntry]:
        keys: set[str] = set()
        names: dict[str, TenantEntry] = {}
        for i, t in enumerate(tenants):
            if t.key in keys:
                raise ValueError(f"tenant {i} ('{t.name}') repeats an API key given earlier")
            keys.add(t.key)
            same = names.setdefault(t.name, t)
            if same.model_dump(exclude={"key"}) != t.model_dump(exclude={"key"}):
                raise ValueError(f"tenant '{t.name}' is listed twice with different settings")
        return tenants


TENANTS_EXAMPLE = (
    "expected YAML like 'tenants: [{name: team-a, key: sk-..., weight: 1, priority: 0, "
    "max_concurrency: 8, max_queue: 64}]'"
)
KEYS_ENV = "TINYLLM_API_KEYS"


def read_tenant_file(path: str) -> dict[str, TenantSpec]:
    """key -> TenantSpec from a --tenants YAML file, validated (ConfigError naming the field);
    read as recipes are (`util.safe_yaml`: a duplicate key is an error, not a silent override)."""
    import yaml

    from tinyllm.util import safe_yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = safe_yaml.load(f.read(safe_yaml.MAX_BYTES + 1))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read tenants from {path} ({e}); {TENANTS_EXAMPLE}") from None
    try:
        parsed = TenantFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "the file"
        raise ConfigError(
            f"cannot read tenants from {path}: {where}: {first['msg']}; {TENANTS_EXAMPLE}"
        ) from None
    return {
        t.key: TenantSpec(t.name, t.weight, t.priority, t.max_concurrency, t.max_queue)
        for t in parsed.tenants
    }


def read_key_file(path: str) -> list[str]:
    """API keys, one a line (blank lines and lines starting with # skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read API keys from {path} ({e})") from None
    keys = [ln for ln in lines if ln and not ln.startswith("#")]
    if not keys:
        raise ConfigError(f"{path} holds no API key: put one key on each line")
    if bad := [i for i, k in enumerate(keys) if any(c.isspace() for c in k)]:
        raise ConfigError(f"{path}: key {bad[0] + 1} contains whitespace; one key a line")
    return keys


def load_tenants(
    path: str | None,
    keys: list[str],
    key_file: str | None = None,
    environ: dict[str, str] | None = None,
) -> dict[str, TenantSpec] | None:
    """API keys -> tenants, from `--api-key K`, `--api-key-file F` (one key a line) and the
    TINYLLM_API_KEYS environment variable (comma-separated), each key its own tenant, and a
    `--tenants` YAML file: `tenants: [{name, key, weight, priority, max_concurrency,
    max_queue}]`. None when no source gives a key (no auth)."""
    import os

    env = os.environ if environ is None else environ
    plain = list(keys)
    if key_file:
        plain += read_key_file(key_file)
    plain += [k.strip() for k in env.get(KEYS_ENV, "").split(",") if k.strip()]
    out = {k: TenantSpec(f"key{i + 1}") for i, k in enumerate(dict.fromkeys(plain))}
    if path:
        for key, spec in read_tenant_file(path).items():
            if key in out:
                raise ConfigError(f"the key of tenant '{spec.name}' in {path} is also given "
                                  "as a plain API key; give each key once")  # fmt: skip
            out[key] = spec
    return out or None


def server_keys(
    host: str,
    insecure: bool,
    keys: list[str],
    key_file: str | None = None,
    tenants: str | None = None,
) -> dict[str, TenantSpec] | None:
    """The tenants of every key source (`load_tenants`), refusing a keyless bind beyond loopback
    unless `insecure` (`check_exposure`): what `tinyllm serve` checks before loading the model."""
    found = load_tenants(tenants, keys, key_file)
    check_exposure(host, found, insecure)
    return found


def serve(
    engine: Engine,
    model_name: str,
    keys: dict[str, TenantSpec] | None,
    host: str,
    port: int,
    limits: ServerLimits | None = None,
) -> None:
    """Serve until Ctrl-C: HTTP (uvicorn) on a side thread, the engine loop on this one."""
    import signal
    import sys
    import threading

    import uvicorn

    limits = limits or ServerLimits(bind_host=host)
    # the engine thread holds the GIL between kernels; a short switch interval lets the event
    # loop send each token promptly instead of waiting up to the default 5 ms
    sys.setswitchinterval(0.0005)
    loop = EngineLoop(engine, limits.stall_seconds)
    app = create_app(engine, model_name, keys, engine_loop=loop, limits=limits)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    http = threading.Thread(target=server.run, name="tinyllm-http", daemon=True)
    http.start()
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())  # Ctrl-C raises KeyboardInterrupt
    try:
        while http.is_alive() and not loop._stop.is_set():
            loop.run_until(lambda: not http.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
