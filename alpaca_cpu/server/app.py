"""The HTTP layer: FastAPI routes over the scheduler (docs/design.md, "The server").

Handlers validate and tokenize a request (pydantic models, the tokenizer and chat format),
queue it for the scheduler and turn the scheduler's typed events into OpenAI-shaped JSON or
server-sent events; they never call the engine. The scheduler's thread owns the model.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..llama import GenerationStep, Llama, TokenLogprob, _openai_logprobs
from ..sampling import SamplingParams
from ..structured import Constraint
from ..tool_calls import CallStream, Piece, ToolPlan
from . import constraints, webui
from . import protocol as p
from .scheduler import (
    Embedded,
    EmbeddingRequest,
    Event,
    Failed,
    GenerationRequest,
    QueueFullError,
    Scheduler,
    ShuttingDownError,
)

log = logging.getLogger("alpaca_cpu.server")
access_log = logging.getLogger("alpaca_cpu.server.access")

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks its client


@dataclass(frozen=True)
class ServerSettings:
    """What a server serves and its limits (alpaca-server's options)."""

    model_id: str
    api_key: str | None = None
    max_queue: int = 64  # requests waiting for a slot; more get 503 + Retry-After
    max_tokens_limit: int = 32768  # a request's max_tokens above this is a 400
    max_body_bytes: int = 1 << 20  # larger request bodies are a 413
    # tokens per scheduler step (decode tokens + prompt chunks): a bound on how long running
    # streams wait while a long prompt is prefilled, and on a short request's first token
    n_batch: int = 256
    retry_after_s: int = 1
    webui: bool = True  # the chat page at / (alpaca-server --no-webui: off)


# ---- edge: body limit, access log, request counts (pure ASGI, so streams stay unbuffered) --

class _BodyTooLarge(Exception):
    pass


class EdgeMiddleware:
    def __init__(self, app: Any, settings: ServerSettings,
                 on_done: Callable[[str, int], None]) -> None:
        self.app, self.settings, self.on_done = app, settings, on_done

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 0
        limit = self.settings.max_body_bytes
        too_large = p.OpenAIError(413, f"the request body is over the limit of {limit} bytes",
                                  param="body", code="body_too_large")

        async def send_logged(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0

        async def receive_limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                await _send_error(send_logged, too_large)
            else:
                await self.app(scope, receive_limited, send_logged)
        except _BodyTooLarge:
            if status == 0:
                await _send_error(send_logged, too_large)
        finally:
            path = scope.get("path", "")
            access_log.info('%s "%s %s" %d %.3fs', _client(scope), scope.get("method"), path,
                            status, time.perf_counter() - t0)
            self.on_done(path, status)


def _client(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


async def _send_error(send: Any, err: p.OpenAIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error_response(err: p.OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ---- the bridge from the scheduler's thread to a handler's event loop --------------------

class _Channel:
    """Events of one request, pushed from the scheduler's thread, awaited by its handler."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening
            pass


def _deliver_by_loop(events: list[tuple[Callable[[Event], None], Event]]) -> None:
    """A scheduler step's events, one wake-up of each event loop for all of them: a wake-up per
    event costs the scheduler's thread a pipe write and a hand-over of the GIL each (11 % of
    its time with 4 streams on SmolLM2)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event], Event]]] = {}
    for emit, event in events:
        ch = getattr(emit, "__self__", None)
        if isinstance(ch, _Channel):
            by_loop.setdefault(ch.loop, []).append((ch.queue, event))
        else:
            emit(event)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening
            pass


def _put_all(items: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class _ClientGone(Exception):
    pass


class _Metrics:
    """Prometheus metrics: request counts by endpoint and status, and the scheduler's
    numbers read at each scrape."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("alpaca_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=self.registry)
        self.scheduler = scheduler
        self.registry.register(self)

    def collect(self) -> Any:
        s = self.scheduler.stats
        yield CounterMetricFamily("alpaca_prompt_tokens", "Prompt tokens of requests run",
                                  value=s.prompt_tokens)
        yield CounterMetricFamily("alpaca_prompt_tokens_evaluated",
                                  "Prompt tokens computed (not reused from a slot's cache)",
                                  value=s.evaluated_tokens)
        yield CounterMetricFamily("alpaca_generated_tokens", "Tokens generated",
                                  value=s.generated_tokens)
        yield CounterMetricFamily("alpaca_cancelled_requests",
                                  "Requests cancelled (client gone or shutdown)",
                                  value=s.cancelled)
        snap = self.scheduler.snapshot()
        yield GaugeMetricFamily("alpaca_decode_tokens_per_second",
                                "Tokens generated per second, all slots, last 10 s",
                                value=snap["decode_tokens_per_second"])
        yield GaugeMetricFamily("alpaca_queue_depth", "Requests waiting for a slot",
                                value=snap["queue_depth"])
        yield GaugeMetricFamily("alpaca_slots_busy", "Slots serving a request",
                                value=snap["busy_slots"])
        yield GaugeMetricFamily("alpaca_slots", "Slots (--parallel)", value=snap["n_slots"])

    def count(self, path: str, status: int) -> None:
        known = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
                 "/v1/embeddings")
        self.requests.labels(path if path in known else "other", str(status)).inc()


# ---- the application ---------------------------------------------------------------------

def create_app(llama: Llama, settings: ServerSettings,
               scheduler: Scheduler | None = None) -> FastAPI:
    """The server's ASGI app over `llama`, whose model (its n_seq_max slots) the scheduler's
    thread owns from the app's start to its end: do not generate with `llama` meanwhile."""
    sched = scheduler or Scheduler(llama, max_queue=settings.max_queue, n_batch=settings.n_batch)
    sched.deliver = _deliver_by_loop
    metrics = _Metrics(sched)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sched.start()
        try:
            yield
        finally:
            await asyncio.to_thread(sched.stop)

    app = FastAPI(title="alpaca-server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.scheduler = sched
    app.add_middleware(EdgeMiddleware, settings=settings, on_done=metrics.count)

    @app.exception_handler(p.OpenAIError)
    async def _openai_error(_: Request, exc: p.OpenAIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        what = f"{param}: " if param else ""
        return _error_response(p.OpenAIError(400, f"{what}{first.get('msg')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(p.OpenAIError(exc.status_code, str(exc.detail), code=code))

    async def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, key = got.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
                key.strip().encode(), settings.api_key.encode()):
            raise p.OpenAIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                code="invalid_api_key")

    auth = [Depends(require_key)]

    def check_model(model: str) -> None:
        if model != settings.model_id:
            raise p.OpenAIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{settings.model_id!r}", param="model", code="model_not_found")

    if settings.webui:
        webui.mount(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "slots": len(sched.slots),
                             "slots_busy": sched.busy_slots, "queue": sched.queue_depth})

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(settings.model_id, created)]}

    @app.get("/v1/models/{model_id}", dependencies=auth)
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return _model_card(settings.model_id, created)

    @app.get("/metrics", dependencies=auth)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    def submit(req: GenerationRequest | EmbeddingRequest) -> None:
        try:
            sched.submit(req)
        except (QueueFullError, ShuttingDownError) as e:
            raise p.OpenAIError(503, f"the server is busy ({e}); retry later", "server_error",
                                code="overloaded",
                                headers={"Retry-After": str(settings.retry_after_s)}) from None

    async def next_event(ch: _Channel, req: GenerationRequest | EmbeddingRequest,
                         request: Request) -> Event:
        """The request's next event; _ClientGone (and the request cancelled) when its client
        disconnects meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(ch.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11)
                if await request.is_disconnected():
                    req.cancelled.set()
                    sched.wake()
                    raise _ClientGone from None

    def generation(body: p._Sampling, prompt: list[int], stops: list[str],
                   logprobs: int | None, ch: _Channel, max_tokens: int | None,
                   constraint: Constraint | None) -> GenerationRequest:
        if max_tokens is not None and max_tokens > settings.max_tokens_limit:
            raise p.OpenAIError(400, f"max_tokens = {max_tokens} is over this server's limit of "
                                f"{settings.max_tokens_limit}", param="max_tokens")
        params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                min_p=body.min_p, repeat_penalty=body.repeat_penalty,
                                presence_penalty=body.presence_penalty,
                                frequency_penalty=body.frequency_penalty,
                                logit_bias=body.logit_bias)
        try:
            params.validate(llama.n_vocab())
        except ValueError as e:
            raise p.OpenAIError(400, str(e)) from None
        user_stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return GenerationRequest(prompt, params, body.seed, max_tokens, user_stops + stops,
                                 logprobs, ch.emit, constraint)

    @app.post("/v1/completions", dependencies=auth, response_model=None)
    async def completions(body: p.CompletionRequest,
                          request: Request) -> JSONResponse | StreamingResponse:
        check_model(body.model)
        prompt = _completion_prompt(llama, body.prompt)
        # compiled off the event loop (a big schema takes a while), before the request queues
        constraint = await asyncio.to_thread(
            lambda: constraints.constraint(llama, constraints.completion_grammar(body),
                                           "grammar" if body.grammar is not None
                                           else "json_schema" if body.json_schema is not None
                                           else "response_format"))
        ch = _Channel()
        req = generation(body, prompt, [], body.logprobs, ch, body.max_tokens, constraint)
        echo = ""
        if body.echo:
            echo = (body.prompt if isinstance(body.prompt, str)
                    else body.prompt[0] if isinstance(body.prompt[0], str)
                    else llama.detokenize(prompt).decode("utf-8", "replace"))
        submit(req)
        meta = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion",
                "created": int(time.time()), "model": settings.model_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            shape = _completion_shape(meta, echo, body.logprobs, len(prompt), include_usage)
            return _sse(_event_stream(shape, ch, req, request, next_event), req, sched)
        text, lps, last = [echo], [], None
        offset = len(echo)
        try:
            while last is None:
                ev = await next_event(ch, req, request)
                step = _step_or_raise(ev)
                if step.logprobs is not None:
                    lps.append((step.logprobs, offset))
                text.append(step.text)
                offset += len(step.text)
                if step.finish_reason is not None:
                    last = step
        except _ClientGone:
            return JSONResponse({}, status_code=499)
        choice = {"text": "".join(text), "index": 0, "finish_reason": last.finish_reason,
                  "logprobs": _openai_logprobs(lps) if body.logprobs is not None else None}
        return JSONResponse({**meta, "choices": [choice],
                             "usage": _usage(len(prompt), last.n_completion)})

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None)
    async def chat(body: p.ChatCompletionRequest,
                   request: Request) -> JSONResponse | StreamingResponse:
        check_model(body.model)
        grammar, plan = await asyncio.to_thread(constraints.chat_constraint, llama, body)
        prompt = _chat_prompt(llama, body.messages, plan)
        param = ("grammar" if body.grammar is not None
                 else "tools" if plan is not None and plan.mode != "none" else "response_format")
        constraint = await asyncio.to_thread(constraints.constraint, llama, grammar, param)
        calls = plan if plan is not None and plan.mode != "none" else None  # may answer a call
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                      else body.max_tokens)
        ch = _Channel()
        # under a constraint the grammar ends the answer (end-of-generation tokens), and the
        # chat format's stop text may be part of a JSON string there (as in the library)
        stops = [] if constraint is not None else list(llama._chat.stop)
        req = generation(body, prompt, stops, top, ch, max_tokens, constraint)
        submit(req)
        meta = {"id": f"chatcmpl-{uuid.uuid4()}", "object": "chat.completion",
                "created": int(time.time()), "model": settings.model_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            shape = _chat_shape(meta, top, len(prompt), include_usage, calls)
            return _sse(_event_stream(shape, ch, req, request, next_event), req, sched)
        text, lps, last = [], [], None
        try:
            while last is None:
                step = _step_or_raise(await next_event(ch, req, request))
                text.append(step.text)
                if step.logprobs is not None:
                    lps.append(_chat_logprob(step.logprobs))
                if step.finish_reason is not None:
                    last = step
        except _ClientGone:
            return JSONResponse({}, status_code=499)
        answer = "".join(text)
        message: dict[str, Any] = {"role": "assistant", "content": answer}
        finish = last.finish_reason
        tool_calls = calls.parse(answer) if calls is not None and finish == "stop" else None
        if tool_calls:
            message, finish = {"role": "assistant", "content": None,
                               "tool_calls": tool_calls}, "tool_calls"
        choice = {"index": 0, "finish_reason": finish, "message": message,
                  "logprobs": {"content": lps} if top is not None else None}
        return JSONResponse({**meta, "choices": [choice],
                             "usage": _usage(len(prompt), last.n_completion)})

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(body: p.EmbeddingRequest, request: Request) -> JSONResponse:
        check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        inputs = []
        for i, text in enumerate(texts):
            what = "input" if isinstance(body.input, str) else f"input[{i}]"
            try:
                inputs.append(llama.embedding_tokens(text, truncate=False, what=what))
            except ValueError as e:
                code = "context_length_exceeded" if "context" in str(e) else None
                raise p.OpenAIError(400, str(e), param="input", code=code) from None
        ch = _Channel()
        req = EmbeddingRequest(inputs, ch.emit)
        submit(req)
        try:
            ev = await next_event(ch, req, request)
        except _ClientGone:
            return JSONResponse({}, status_code=499)
        if isinstance(ev, Failed):
            raise p.OpenAIError(500, ev.message, "server_error")
        assert isinstance(ev, Embedded)

        def encode(v: list[float]) -> list[float] | str:
            if body.encoding_format == "base64":
                return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
            return v
        return JSONResponse({"object": "list", "model": settings.model_id,
                             "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                                      for i, v in enumerate(ev.vectors)],
                             "usage": {"prompt_tokens": ev.n_tokens,
                                       "total_tokens": ev.n_tokens}})

    return app


# ---- request -> prompt tokens ---------------------------------------------------------------

def _too_long(n: int, n_ctx: int, param: str) -> p.OpenAIError:
    return p.OpenAIError(400, f"the prompt has {n} tokens, more than the context of {n_ctx} "
                         f"tokens", param=param, code="context_length_exceeded")


def _completion_prompt(llama: Llama, prompt: str | list[str] | list[int]) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise p.OpenAIError(400, f"prompt: {len(prompt)} prompts in one request; this "
                                f"server takes one (send one request each)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        try:
            tokens = llama.tokenizer_.encode(prompt, special=True, what="prompt")
        except ValueError as e:
            raise p.OpenAIError(400, str(e), param="prompt") from None
        if "\x00" in prompt:
            raise p.OpenAIError(400, "prompt contains a NUL character", param="prompt")
    else:
        bad = [t for t in prompt if not 0 <= t < llama.n_vocab()]
        if bad:
            raise p.OpenAIError(400, f"prompt: token id {bad[0]} outside [0, {llama.n_vocab()})",
                                param="prompt")
        tokens = list(prompt)
    if not tokens:
        raise p.OpenAIError(400, "prompt is empty", param="prompt")
    if len(tokens) > llama.n_ctx():
        raise _too_long(len(tokens), llama.n_ctx(), "prompt")
    return tokens


def _chat_prompt(llama: Llama, messages: list[p.ChatMessage],
                 plan: ToolPlan | None) -> list[int]:
    """The prompt's tokens; tool calls and results in the history are rendered as the library
    renders them (ToolPlan.prompt_messages), with the tools for a template that takes them."""
    plain: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = ROLES.get(m.role)
        if role is None:
            raise p.OpenAIError(400, f"messages[{i}].role: unknown role {m.role!r} (expected "
                                f"one of {', '.join(ROLES)})", param=f"messages[{i}].role")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                kind = part.get("type")
                if kind != "text" or not isinstance(part.get("text"), str):
                    what = ("image parts are not supported" if kind in ("image_url", "input_image")
                            else f"unsupported content part of type {kind!r}")
                    raise p.OpenAIError(400, f"messages[{i}].content[{j}]: {what}; this model "
                                        f"reads text only", param=f"messages[{i}].content[{j}]")
                texts.append(part["text"])
            content = "\n".join(texts)
        else:
            content = m.content or ""
        message: dict[str, Any] = {"role": role, "content": content}
        if m.tool_calls is not None:
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        plain.append(message)
    plan = plan or constraints.history_plan(llama, plain)
    try:
        if plan is None:
            return llama.render_chat(plain)
        use_tools = plan.syntax.name != "generic" and plan.mode != "none"
        return llama.render_chat(plan.prompt_messages(plain),
                                 tools=plan.tools if use_tools else None)
    except ValueError as e:
        if "context" in str(e):
            raise p.OpenAIError(400, str(e), param="messages",
                                code="context_length_exceeded") from None
        raise p.OpenAIError(400, str(e), param="messages") from None


# ---- events -> OpenAI shapes ----------------------------------------------------------------

def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "alpaca-cpu"}


def _usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
            "total_tokens": n_prompt + n_completion}


def _step_or_raise(ev: Event) -> GenerationStep:
    if isinstance(ev, Failed):
        raise p.OpenAIError(500, ev.message, "server_error")
    assert isinstance(ev, GenerationStep)
    return ev


def _chat_logprob(lp: TokenLogprob) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    return {**entry(lp.token, lp.logprob),
            "top_logprobs": [entry(t, v) for t, v in lp.top.items()]}


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


NextEvent = Callable[[_Channel, GenerationRequest, Request], Any]


@dataclass
class _StreamShape:
    """How one endpoint's stream looks: its first chunks, the chunks of each step (often one,
    none when there is nothing to send), the closing chunks (the last with the finish
    reason); meta of the usage chunk (None: none)."""

    head: list[dict[str, Any]]
    step: Callable[[GenerationStep], list[dict[str, Any]]]
    finish: Callable[[str], list[dict[str, Any]]]
    usage_meta: dict[str, Any] | None
    n_prompt: int


async def _event_stream(shape: _StreamShape, ch: _Channel, req: GenerationRequest,
                        request: Request, next_event: NextEvent) -> AsyncIterator[str]:
    for chunk in shape.head:
        yield _data(chunk)
    while True:
        ev = await next_event(ch, req, request)
        if isinstance(ev, Failed):
            yield _data(p.OpenAIError(500, ev.message, "server_error").body())
            return
        assert isinstance(ev, GenerationStep)
        for chunk in shape.step(ev):
            yield _data(chunk)
        if ev.finish_reason is not None:
            for chunk in shape.finish(ev.finish_reason):
                yield _data(chunk)
            if shape.usage_meta is not None:
                yield _data({**shape.usage_meta, "choices": [],
                             "usage": _usage(shape.n_prompt, ev.n_completion)})
            yield "data: [DONE]\n\n"
            return


def _completion_shape(meta: dict[str, Any], echo: str, logprobs: int | None, n_prompt: int,
                      include_usage: bool) -> _StreamShape:
    def chunk(text: str, finish: str | None, lp: Any = None) -> dict[str, Any]:
        return {**meta, "choices": [{"text": text, "index": 0, "logprobs": lp,
                                     "finish_reason": finish}]}
    offset = len(echo)

    def step(ev: GenerationStep) -> list[dict[str, Any]]:
        nonlocal offset
        if not ev.text and ev.logprobs is None:
            return []
        lp = (_openai_logprobs([(ev.logprobs, offset)])
              if logprobs is not None and ev.logprobs is not None else None)
        offset += len(ev.text)
        return [chunk(ev.text, None, lp)]
    return _StreamShape([chunk(echo, None)] if echo else [], step,
                        lambda finish: [chunk("", finish)], meta if include_usage else None,
                        n_prompt)


def _chat_shape(meta: dict[str, Any], top: int | None, n_prompt: int,
                include_usage: bool, plan: ToolPlan | None) -> _StreamShape:
    """Chat chunks; with `plan` (tools the answer may call) the text goes through CallStream:
    a call streams as tool_calls deltas (OpenAI's: index, id, type and name first, then
    argument pieces) and finishes with "tool_calls"."""
    meta = {**meta, "object": "chat.completion.chunk"}
    calls = CallStream(plan.syntax) if plan is not None else None

    def chunk(delta: dict[str, Any], finish: str | None, lp: Any = None) -> dict[str, Any]:
        return {**meta, "choices": [{"index": 0, "delta": delta, "logprobs": lp,
                                     "finish_reason": finish}]}

    def deltas(pieces: list[Piece]) -> list[dict[str, Any]]:
        return [{"tool_calls": [call]} if call is not None else {"content": text}
                for text, call in pieces if call is not None or text]

    def step(ev: GenerationStep) -> list[dict[str, Any]]:
        with_lp = top is not None and ev.logprobs is not None
        lp = {"content": [_chat_logprob(ev.logprobs)]} if with_lp else None
        if calls is None:
            return [chunk({"content": ev.text}, None, lp)] if ev.text or with_lp else []
        out = deltas(calls.feed(ev.text))
        if not out and with_lp:
            out = [{}]  # the token's logprobs, its text held back (it may be a call's head)
        return [chunk(d, None, lp if i == 0 else None) for i, d in enumerate(out)]

    def finish(reason: str) -> list[dict[str, Any]]:
        if calls is None:
            return [chunk({}, reason)]
        out = [chunk(d, None) for d in deltas(calls.close())]
        return [*out, chunk({}, "tool_calls" if calls.started and reason == "stop" else reason)]
    return _StreamShape([chunk({"role": "assistant", "content": ""}, None)], step, finish,
                        meta if include_usage else None, n_prompt)


def _sse(chunks: AsyncIterator[str], req: GenerationRequest | EmbeddingRequest,
         sched: Scheduler) -> StreamingResponse:
    """A server-sent event stream; when it ends early (the client went away), the request is
    cancelled and its slot freed at the scheduler's next step."""
    async def guarded() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield c
        except _ClientGone:
            return
        finally:
            if not req.cancelled.is_set():
                req.cancelled.set()
                sched.wake()
    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
