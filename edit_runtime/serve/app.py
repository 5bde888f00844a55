"""The OpenAI-compatible HTTP layer: ``create_app(engine)`` -> a FastAPI application.

Endpoints:

- ``GET /v1/models``: the served names (``<base>`` and ``<base>+<delta>`` per delta; only the
  latter in merged mode).
- ``POST /v1/chat/completions`` and ``POST /v1/completions``: ``stream: true`` answers with
  server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``; with
  ``stream_options.include_usage`` a last chunk carries the usage).
- ``GET /health``: 200 ``{"status": "ok"}`` while the engine runs, else 503.
- ``GET /metrics``: Prometheus text format (``text/plain; version=0.0.4``); ``?format=json`` gives
  the same numbers as JSON, with p50/p95/p99 over the last 10,000 observations.

Every error is an OpenAI error body ``{"error": {"message", "type", "param", "code"}}``: 400 for
malformed JSON, missing fields or bad parameters (pydantic's message, with the offending value),
400 ``context_length_exceeded`` for oversize prompts or ``max_tokens``, 404 ``model_not_found``,
413 for bodies over ``max_request_bytes``, 503 ``queue_full`` when the waiting queue is full, 500
when the request failed inside the engine (the engine keeps serving). An error after a stream
has started arrives as a ``data: {"error": ...}`` event (what the ``openai`` client raises on).

A client that disconnects frees its slot: a stream's response object cancels its request in the
engine when it ends without the final event; a non-streaming handler polls for the disconnect
while it waits. The app does not start or stop the engine unless ``manage_engine=True``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse

from edit_runtime.serve.engine import (
    Event,
    Failed,
    Finished,
    Histogram,
    RequestError,
    SamplingParams,
    ServingEngine,
    TextDelta,
)
from edit_runtime.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    error_body,
)

log = logging.getLogger(__name__)

__all__ = ["create_app", "HTTPMetrics", "render_prometheus"]

_ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")
_DISCONNECT_POLL_S = 0.25
#: a location element that names a union member's type, not a field
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list|dict)$|[\[\]()]")


# ---------------------------------------------------------------------------------------- metrics
class HTTPMetrics:
    """Requests per (route, status) and latency per route (until the last byte of a stream)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            hist = self.latency.get(route)
            if hist is None:
                hist = self.latency[route] = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                                        30, 60, 120))
            hist.observe(seconds)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            total = sum(self.requests.values())
            errors = sum(n for (_, s), n in self.requests.items() if s >= 400)
            return {
                "requests_total": total,
                "errors_total": errors,
                "requests": [{"route": r, "status": s, "count": n} for (r, s), n in sorted(self.requests.items())],
                "latency_s": {r: h.snapshot() for r, h in sorted(self.latency.items())},
            }


class _MetricsMiddleware:
    """Pure ASGI middleware (no body buffering, so streaming and disconnects are untouched)."""

    def __init__(self, app: Callable, metrics: HTTPMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("path", "")
            self.metrics.observe(route if route in _ROUTES else "other", status[0], time.perf_counter() - t0)


def _labels(**kw: Any) -> str:
    inner = ",".join(f'{k}="{str(v)}"' for k, v in kw.items())
    return "{" + inner + "}" if inner else ""


def _prom_histogram(lines: list[str], name: str, help_: str, snap: dict, **labels: Any) -> None:
    lines.append(f"# HELP {name} {help_}")
    lines.append(f"# TYPE {name} histogram")
    for le, count in snap["buckets"]:
        le_text = le if isinstance(le, str) else repr(float(le))
        lines.append(f"{name}_bucket{_labels(**labels, le=le_text)} {count}")
    lines.append(f"{name}_sum{_labels(**labels)} {snap['sum']}")
    lines.append(f"{name}_count{_labels(**labels)} {snap['count']}")
    for q in ("p50", "p95", "p99"):
        if snap[q] is not None:
            lines.append(f"{name}_recent{_labels(**labels, quantile=q[1:])} {snap[q]}")


def render_prometheus(engine_stats: dict, http_stats: dict) -> str:
    """Prometheus text exposition (version 0.0.4) of the engine and HTTP metrics."""
    p = "edit_runtime_"
    lines: list[str] = []

    def simple(name: str, kind: str, help_: str, rows: list[tuple[dict, Any]]) -> None:
        lines.append(f"# HELP {p}{name} {help_}")
        lines.append(f"# TYPE {p}{name} {kind}")
        for labels, value in rows:
            lines.append(f"{p}{name}{_labels(**labels)} {float(value) if isinstance(value, bool) else value}")

    r = engine_stats["requests"]
    simple("engine_requests_total", "counter", "Requests by outcome inside the engine.",
           [({"outcome": k}, r[k]) for k in ("submitted", "finished", "failed", "rejected", "cancelled")])
    simple("engine_finish_reason_total", "counter", "Finished requests by finish_reason.",
           [({"reason": k}, v) for k, v in sorted(r["finish_reasons"].items())])
    simple("engine_requests_by_model_total", "counter", "Submitted requests by model name.",
           [({"model": k}, v) for k, v in sorted(r["by_model"].items())])
    t = engine_stats["tokens"]
    simple("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [({}, t["prompt"])])
    simple("generation_tokens_total", "counter", "Generated tokens of finished requests.", [({}, t["completion"])])
    s = engine_stats["steps"]
    simple("decode_steps_total", "counter", "Batched decode forwards.", [({}, s["decode"])])
    simple("prefills_total", "counter", "Prompt prefills.", [({}, s["prefill"])])
    simple("forward_errors_total", "counter", "Batched forwards that raised.", [({}, s["forward_errors"])])
    simple("queue_depth", "gauge", "Requests waiting for a batch slot.", [({}, engine_stats["queue_depth"])])
    simple("active_sequences", "gauge", "Sequences in the running batch.", [({}, engine_stats["active"])])
    simple("engine_running", "gauge", "1 while the engine thread runs.", [({}, int(engine_stats["running"]))])
    if engine_stats.get("gate"):
        simple("gate_decisions_total", "counter", "Prefill decisions of each gated delta's probe.",
               [({"delta": d, "decision": k}, g[k]) for d, g in sorted(engine_stats["gate"].items())
                for k in ("on", "off")])
    for key, name, help_ in (("latency_s", "request_latency_seconds", "Submit to last token."),
                             ("ttft_s", "time_to_first_token_seconds", "Submit to first generated token."),
                             ("queue_wait_s", "queue_wait_seconds", "Submit to prefill start."),
                             ("decode_step_s", "decode_step_seconds", "One batched decode step."),
                             ("prefill_s", "prefill_seconds", "One prompt prefill."),
                             ("batch_size", "decode_batch_size", "Sequences per decode step.")):
        _prom_histogram(lines, p + name, help_, engine_stats[key])
    simple("http_requests_total", "counter", "HTTP requests by route and status.",
           [({"route": x["route"], "status": x["status"]}, x["count"]) for x in http_stats["requests"]])
    name = p + "http_request_duration_seconds"
    first = True
    for route, snap in http_stats["latency_s"].items():
        block: list[str] = []
        _prom_histogram(block, name, "HTTP request duration (streams: until the last event).", snap, route=route)
        lines.extend(block if first else block[2:])  # HELP/TYPE once per metric family
        first = False
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ utils
class _AsyncSink:
    """Engine-thread -> event-loop bridge: events land in an ``asyncio.Queue``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class _ClientGone(Exception):
    pass


def _error_response(exc: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=headers)


def _failure_response(error: BaseException, request_id: str) -> JSONResponse:
    if isinstance(error, RequestError):
        return _error_response(error)
    return JSONResponse(error_body(f"request {request_id} failed inside the engine: {type(error).__name__}: {error}",
                                   "server_error", None, "internal_error"), status_code=500)


def _field_path(error: Mapping[str, Any]) -> list[str]:
    """An error's location as the request's field path: without FastAPI's "body" and without the
    member tags pydantic adds inside a union (``content.str``, ``content.list[ContentPart]``)."""
    loc = [str(x) for x in error.get("loc", ()) if x != "body"]
    return [x for x in loc if not _UNION_TAG.search(x)]


def _validation_error(exc: ValidationError | RequestValidationError) -> RequestError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": str(exc), "type": ""}
    # A union reports one error per member; of those about the first field, the deepest is about
    # the member the value was meant for (an image part: its "type", not "not a string").
    same = [e for e in errors if _field_path(e)[:1] == _field_path(first)[:1]]
    first = max(same, key=lambda e: len(_field_path(e)), default=first)
    loc = _field_path(first)
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        return RequestError(f"Missing required parameter: {param!r}", param=param, code="missing_required_parameter")
    value = first.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return RequestError(f"Invalid value for {param!r}: {msg}{shown}{more}" if param else f"{msg}{more}",
                        param=param, code="invalid_value")


def _usage(event: Finished) -> Usage:
    return Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                 total_tokens=event.prompt_tokens + event.completion_tokens)


def _sse(payload: Any) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


# ------------------------------------------------------------------------------------------- app
def create_app(engine: ServingEngine, *, manage_engine: bool = False, max_request_bytes: int = 4 << 20,
               title: str = "edit_runtime OpenAI-compatible server") -> FastAPI:
    """The FastAPI app serving ``engine``.

    Args:
        engine: a :class:`ServingEngine` (started by the caller unless ``manage_engine``).
        manage_engine: start the engine at application start-up and shut it down (removing its
            patches) at shutdown.
        max_request_bytes: larger request bodies get 413.
        title: OpenAPI title.
    """
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title=title, lifespan=lifespan)
    http_metrics = HTTPMetrics()
    app.state.engine = engine
    app.state.http_metrics = http_metrics
    app.add_middleware(_MetricsMiddleware, metrics=http_metrics)
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}", "server_error", None,
                                       "internal_error"), status_code=500)

    async def parse(request: Request, model_cls: type) -> Any:
        raw = await request.body()
        if len(raw) > max_request_bytes:
            raise RequestError(f"the request body has {len(raw)} bytes, more than this server's limit of "
                               f"{max_request_bytes}", code="request_too_large", status=413)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"We could not parse the JSON body of your request: {exc}",
                               code="invalid_json") from None
        if not isinstance(data, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}",
                               code="invalid_json")
        try:
            return model_cls.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    async def wait_final(request: Request, sink: _AsyncSink, request_id: str) -> Finished | Response:
        """The finished non-streaming request, or the response to send instead: a failure body,
        or 499 when the client went away (its request is cancelled in the engine)."""
        try:
            event = await _wait_last_event(request, sink)
        except _ClientGone:
            engine.cancel(request_id)
            return Response(status_code=499)
        except BaseException:
            engine.cancel(request_id)
            raise
        return _failure_response(event.error, request_id) if isinstance(event, Failed) else event

    async def _wait_last_event(request: Request, sink: _AsyncSink) -> Finished | Failed:
        """Waits for the last event of a non-streaming request, watching for a disconnect."""
        getter: asyncio.Future | None = None
        next_poll = time.monotonic() + _DISCONNECT_POLL_S
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(sink.queue.get())
                done, _ = await asyncio.wait({getter}, timeout=max(0.0, next_poll - time.monotonic()))
                if done:
                    event, getter = getter.result(), None
                    if isinstance(event, (Finished, Failed)):
                        return event
                # Poll on the clock, not on silence: token events can arrive faster than the poll
                # interval for the whole request, and a gone client must still be noticed.
                if time.monotonic() >= next_poll:
                    if await request.is_disconnected():
                        raise _ClientGone
                    next_poll = time.monotonic() + _DISCONNECT_POLL_S
        finally:
            if getter is not None:
                getter.cancel()

    def submit(request_id: str, body: Any, prompt_ids: list[int], given_max: int | None,
               prompt_param: str, loop: asyncio.AbstractEventLoop) -> _AsyncSink:
        max_tokens = given_max if given_max is not None else (
            engine.default_max_tokens(len(prompt_ids)) if prompt_param == "messages" else 16)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=body.stop_list(),
            seed=body.seed,
        )
        engine.check_request(prompt_ids, params, prompt_param=prompt_param, max_tokens_given=given_max is not None)
        sink = _AsyncSink(loop)
        engine.submit(prompt_ids, params, sink, model=body.model, request_id=request_id)
        return sink

    async def sse_events(sink: _AsyncSink, request_id: str, finished: list[bool], *, opening: str | None,
                         text_chunk: Callable[[str], str],
                         final_chunks: Callable[[Finished], list[str]]) -> AsyncIterator[str]:
        """The SSE lines of one streamed request: ``opening``, a chunk per text delta, then the
        final chunks and ``[DONE]`` (or an error body). Sets ``finished[0]`` at the last event."""
        if opening is not None:
            yield opening
        while True:
            event = await sink.queue.get()
            if isinstance(event, TextDelta):
                yield text_chunk(event.text)
                continue
            finished[0] = True
            if isinstance(event, Failed):
                yield _sse(json.loads(_failure_response(event.error, request_id).body))
                return
            for line in final_chunks(event):
                yield line
            yield _sse("[DONE]")
            return

    def stream_response(request_id: str, events: AsyncIterator[str], finished: list[bool]) -> StreamingResponse:
        class _Stream(StreamingResponse):
            async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    if not finished[0]:  # disconnect or send failure: free the slot now
                        log.info("client of %s went away mid-stream; cancelling", request_id)
                        engine.cancel(request_id)

        return _Stream(events, media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- routes ----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.running
        return JSONResponse({"status": "ok" if ok else "unavailable", "models": engine.model_names},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(format: str = "prometheus") -> Response:
        stats, http = engine.stats(), http_metrics.snapshot()
        if format == "json":
            return JSONResponse({"engine": stats, "http": http})
        if format != "prometheus":
            return _error_response(RequestError(f"format must be 'prometheus' or 'json', got {format!r}",
                                                param="format", code="invalid_value"))
        return PlainTextResponse(render_prometheus(stats, http), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cards = [ModelCard(id=name, created=created, root=engine.served_name,
                           parent=None if engine.resolve_model(name) is None else engine.served_name)
                 for name in engine.model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
            engine.resolve_model(body.model)
            prompt_ids = engine.encode_chat([m.for_template() for m in body.messages])
            sink = submit(request_id, body, prompt_ids, body.requested_max_tokens(), "messages",
                          asyncio.get_running_loop())
        except RequestError as exc:
            return _error_response(exc)

        if not body.stream:
            event = await wait_final(request, sink, request_id)
            if isinstance(event, Response):
                return event
            out = ChatCompletion(id=request_id, model=body.model, usage=_usage(event), choices=[
                ChatChoice(message=ChatCompletionMessage(content=event.text), finish_reason=event.finish_reason)])
            return JSONResponse(out.model_dump())

        finished = [False]
        include_usage = body.include_usage
        now = int(time.time())

        def chunk(delta: ChatDelta, finish: str | None = None) -> str:
            return _sse(ChatCompletionChunk(id=request_id, model=body.model, created=now,
                                            choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])
                        .model_dump())

        def final_chunks(event: Finished) -> list[str]:
            lines = [chunk(ChatDelta(), event.finish_reason)]
            if include_usage:
                lines.append(_sse(ChatCompletionChunk(id=request_id, model=body.model, created=now, choices=[],
                                                      usage=_usage(event)).model_dump()))
            return lines

        events = sse_events(sink, request_id, finished, opening=chunk(ChatDelta(role="assistant", content="")),
                            text_chunk=lambda text: chunk(ChatDelta(content=text)), final_chunks=final_chunks)
        return stream_response(request_id, events, finished)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        request_id = f"cmpl-{uuid.uuid4().hex}"
        try:
            body: CompletionRequest = await parse(request, CompletionRequest)
            engine.resolve_model(body.model)
            prompt = body.prompt
            if isinstance(prompt, list) and isinstance(prompt[0], str):
                prompt = prompt[0]
            prompt_ids = engine.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
            sink = submit(request_id, body, prompt_ids, body.max_tokens, "prompt", asyncio.get_running_loop())
        except RequestError as exc:
            return _error_response(exc)

        if not body.stream:
            event = await wait_final(request, sink, request_id)
            if isinstance(event, Response):
                return event
            out = Completion(id=request_id, model=body.model, usage=_usage(event),
                             choices=[CompletionChoice(text=event.text, finish_reason=event.finish_reason)])
            return JSONResponse(out.model_dump())

        finished = [False]
        include_usage = body.include_usage
        now = int(time.time())

        def chunk(text: str, finish: str | None = None) -> str:
            return _sse(Completion(id=request_id, model=body.model, created=now,
                                   choices=[CompletionChoice(text=text, finish_reason=finish)]).model_dump())

        def final_chunks(event: Finished) -> list[str]:
            lines = [chunk("", event.finish_reason)]
            if include_usage:
                lines.append(_sse(Completion(id=request_id, model=body.model, created=now, choices=[],
                                             usage=_usage(event)).model_dump()))
            return lines

        events = sse_events(sink, request_id, finished, opening=None, text_chunk=chunk, final_chunks=final_chunks)
        return stream_response(request_id, events, finished)

    return app
