"""OpenAI-compatible HTTP server over the engine (FastAPI; run by uvicorn from `tinyllm serve`).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events), GET /v1/models, /health, /metrics (Prometheus text). Every error, the
user's or ours, is a JSON body in OpenAI's shape `{"error": {"message", "type", "param",
"code"}}`; bad input is a 4xx, never a 500. A client that disconnects cancels its sequence, which
frees its KV blocks at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyllm.errors import ConfigError
from tinyllm.runtime.engine import Engine, EngineLoop, Event
from tinyllm.runtime.sampling import SamplingParams
from tinyllm.runtime.scheduler import QueueFull

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class TenantSpec:
    name: str
    weight: float = 1.0
    priority: int = 0
    max_concurrency: int | None = None


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
    """Fields both endpoints share. Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    n: Literal[1] = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False  # an extension (as in vLLM): generate max_tokens whatever comes

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens or max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=[s for s in stop if s],
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Common):
    prompt: str = Field(..., min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)


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


def create_app(
    engine: Engine,
    model_name: str,
    api_keys: dict[str, TenantSpec] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    default_max_tokens: int = 256,
    engine_loop: EngineLoop | None = None,
) -> FastAPI:
    """The app. Without `engine_loop`, an engine loop thread starts and stops with the app;
    `serve()` passes one it runs on the main thread instead (faster kernels, see EngineLoop)."""
    loop_holder: dict[str, EngineLoop] = {}
    if engine_loop is not None:
        loop_holder["loop"] = engine_loop

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        own = engine_loop is None
        if own:
            loop_holder["loop"] = EngineLoop(engine).start()
        yield
        if own:
            loop_holder["loop"].stop()

    app = FastAPI(title="tinyllm", lifespan=lifespan, docs_url=None, redoc_url=None)
    for spec in (api_keys or {}).values():
        engine.scheduler.tenant(
            spec.name,
            weight=spec.weight,
            priority=spec.priority,
            max_concurrency=spec.max_concurrency,
        )
    ctx = _Ctx(engine, model_name, api_keys, default_max_tokens, loop_holder)
    _handlers(app, engine)
    _routes(app, ctx)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


@dataclass
class _Ctx:
    engine: Engine
    model_name: str
    api_keys: dict[str, TenantSpec] | None
    default_max_tokens: int
    loops: dict[str, EngineLoop]

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

    def wake(self) -> None:
        loop = self.loops.get("loop")
        if loop is not None:
            loop.wake()


def _handlers(app: FastAPI, engine: Engine) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        if e.status == 429:
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
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {e}", "server_error"))


def _validation_error(errors: Any) -> APIError:
    first = next(iter(errors), {})
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(
            400, f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json"
        )
    param = ".".join(loc) or None
    where = f"'{param}': " if param else ""
    return APIError(
        400, f"{where}{first.get('msg', 'invalid request')}", param=param, code="invalid_value"
    )


def _routes(app: FastAPI, ctx: _Ctx) -> None:
    engine = ctx.engine

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": ctx.model_name}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
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
        tenant = ctx.tenant(request)
        body = _parse(await _json(request), CompletionRequest)
        ctx.check_model(body.model)
        prompt = engine.tokenizer.encode(body.prompt)
        return await _serve(request, ctx, tenant, body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        tenant = ctx.tenant(request)
        body = _parse(await _json(request), ChatRequest)
        ctx.check_model(body.model)
        try:
            prompt = engine.chat_ids([m.model_dump() for m in body.messages])
        except ConfigError as e:
            raise APIError(400, str(e), param="messages", code="no_chat_template") from None
        return await _serve(request, ctx, tenant, body, prompt, chat=True)


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None


def _parse(data: Any, cls: type[BaseModel]) -> Any:
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_value")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _submit(ctx: _Ctx, tenant: str, body: _Common, prompt: list[int], sink: Any) -> Any:
    engine = ctx.engine
    room = engine.max_context - len(prompt)
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {len(prompt)} tokens; this model's context holds {engine.max_context}",
            param="prompt",
            code="context_length_exceeded",
        )
    params = body.sampling(min(ctx.default_max_tokens, room))
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


async def _serve(
    request: Request, ctx: _Ctx, tenant: str, body: _Common, prompt: list[int], chat: bool
) -> Any:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    seq = _submit(
        ctx, tenant, body, prompt, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
    )
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if body.stream:
        return StreamingResponse(
            _stream(ctx, seq, queue, rid, body.model, chat), media_type="text/event-stream"
        )
    text, reason = [], None
    try:
        while reason is None:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            text.append(ev.text)
            reason = ev.finish_reason
            if ev.error:
                raise APIError(500, f"generation failed: {ev.error}", "server_error")
    finally:
        if reason is None:
            ctx.engine.cancel(seq.id)
            ctx.wake()
    usage = _usage(seq)
    content = "".join(text)
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": content}
    else:
        choice["text"] = content
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [choice],
        "usage": usage,
    }


def _usage(seq: Any) -> dict[str, int]:
    return {
        "prompt_tokens": len(seq.prompt),
        "completion_tokens": len(seq.output),
        "total_tokens": len(seq.prompt) + len(seq.output),
    }


async def _stream(
    ctx: _Ctx, seq: Any, queue: asyncio.Queue, rid: str, model: str, chat: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    reason = None

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
        data = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    try:
        if chat:
            yield chunk("", None, first=True)
        while reason is None:
            ev = await queue.get()
            reason = ev.finish_reason
            if ev.error:
                err = {"error": {"message": ev.error, "type": "server_error"}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            if ev.text or reason:
                yield chunk(ev.text, reason)
        yield "data: [DONE]\n\n"
    finally:
        if reason is None:  # the client went away (or the task was cancelled): free its blocks
            ctx.engine.cancel(seq.id)
            ctx.wake()


def load_tenants(path: str | None, keys: list[str]) -> dict[str, TenantSpec] | None:
    """API keys -> tenants, from `--api-key K` (each its own tenant) and a YAML file:
    `tenants: [{name: a, key: K, weight: 2, priority: 1, max_concurrency: 4}]`."""
    import yaml

    out = {k: TenantSpec(f"key{i + 1}") for i, k in enumerate(keys)}
    if path:
        try:
            data = yaml.safe_load(open(path, encoding="utf-8"))  # noqa: SIM115
            for t in data["tenants"]:
                extra = {k: t[k] for k in ("weight", "priority", "max_concurrency") if k in t}
                out[str(t["key"])] = TenantSpec(str(t["name"]), **extra)
        except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
            raise ConfigError(
                f"cannot read tenants from {path} ({e}); expected YAML like "
                "'tenants: [{name: team-a, key: sk-..., weight: 1, priority: 0, "
                "max_concurrency: 8}]'"
            ) from None
    return out or None


def serve(engine: Engine, model_name: str, keys: dict[str, TenantSpec] | None, host: str,
          port: int) -> None:  # fmt: skip
    """Serve until Ctrl-C: HTTP (uvicorn) on a side thread, the engine loop on this one."""
    import signal
    import sys
    import threading

    import uvicorn

    # the engine thread holds the GIL between kernels; a short switch interval lets the event
    # loop send each token promptly instead of waiting up to the default 5 ms
    sys.setswitchinterval(0.0005)
    loop = EngineLoop(engine)
    app = create_app(engine, model_name, keys, engine_loop=loop)
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
