"""The FastAPI app: OpenAI-compatible completions and chat completions over one BiLD engine.

A request is validated (schemas.py), checked against the model's context and the server's prompt limit, turned into
a `BiLDConfig` on top of the server-wide defaults and queued for the single generation worker (worker.py). Answers
follow the OpenAI shapes and carry a ``bild`` object with the request's fallback/rollback statistics.

Limits (docs/serve.md says how they were sized): a request body of at most `MAX_BODY_BYTES`, counted as it arrives;
a prompt of at most `DEFAULT_MAX_PROMPT_TOKENS` tokens, refused after tokenizing a bounded prefix; at most
`DEFAULT_QUEUE_SIZE` requests waiting. On shutdown (`begin_shutdown`), what still runs after the grace period ends
in-band: a stream with an error event and ``[DONE]``, a plain request with 503 and Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bild.config import BiLDConfig, SamplingConfig
from bild.serve.errors import APIError, body_too_large, error_body, error_response, install_handlers
from bild.serve.metrics import ServerMetrics
from bild.serve.schemas import MAX_BODY_BYTES, ChatCompletionRequest, CompletionRequest, GenerationParams
from bild.serve.worker import Failed, Finished, GenerationWorker, Job, QueueFull, TextDelta, WorkerClosed

logger = logging.getLogger(__name__)

_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
_DISCONNECT_POLL_S = 0.25
# A 2,000-token prompt holds the only worker ~15 s on a busy 2-core CPU (one thread), about as long as a full
# 128-token answer; 4,000 tokens took 41 s. Operators with faster machines raise it (--max-prompt-tokens).
DEFAULT_MAX_PROMPT_TOKENS = 2048
# Waiting beats being turned away: 32 requests of the default 128 tokens are ~10 minutes of work on this machine, the
# openai client's default timeout, and 32 short ones ~35 s. A waiting request holds at most its body (8 MiB) and
# its parsed copies, so the queue's worst case is ~0.8 GB next to ~1.5 GB of models.
DEFAULT_QUEUE_SIZE = 32
RETRY_AFTER_SHUTDOWN_S = 10  # about a restart: the default pair loads in ~8 s
_CHARS_PER_TOKEN_BOUND = 16  # a prompt's first (limit + 1) * 16 characters decide most over-long prompts


@dataclass
class _Server:
    engine: object
    model_name: str
    defaults: BiLDConfig
    worker: GenerationWorker
    context_length: int | None  # None: the model has no fixed limit (e.g. relative positions)
    max_prompt_tokens: int  # the operator's limit; `prompt_limit` also keeps room in the context to generate
    replica: str | None = None  # the Ray Serve replica this app runs in (bild.serve.ray); None: a plain server
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_limit(self) -> int:
        context_room = math.inf if self.context_length is None else self.context_length - 1
        return int(min(self.max_prompt_tokens, context_room))

    def begin_shutdown(self, timeout_s: float) -> None:
        """The HTTP server stopped taking connections: take no new jobs, and end what still runs after `timeout_s`
        in-band (a stream with an error event and [DONE], a plain request with 503), before the HTTP server would
        cut the connections."""
        self.worker.stop_accepting()
        asyncio.get_running_loop().call_later(timeout_s, self.worker.cancel_all)


def create_app(
    engine,
    model_name: str,
    defaults: BiLDConfig | None = None,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    api_key: str | None = None,
    context_length: int | None = None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    replica: str | None = None,
) -> FastAPI:
    """Serve `engine` (a `bild.decoding.BiLD`) under `model_name`.

    `defaults` holds the thresholds, max_new_tokens and sampling used when a request leaves them out; at most
    `queue_size` requests wait while one generates (more get 429); with `api_key` every /v1 route requires
    ``Authorization: Bearer <api_key>``. `context_length` defaults to the models' position limit; prompts longer
    than `max_prompt_tokens` are refused (400, code context_length_exceeded). `replica` names the Ray Serve replica in
    /health (bild.serve.ray).
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    server = _Server(
        engine=engine,
        model_name=model_name,
        defaults=defaults or BiLDConfig(),
        worker=GenerationWorker(engine, queue_size),
        context_length=context_length if context_length is not None else model_context_length(engine),
        max_prompt_tokens=max_prompt_tokens,
        replica=replica,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has stopped taking requests; cancel what still runs so the process can exit promptly.
        await run_in_threadpool(server.worker.close)

    app = FastAPI(title="bild", summary="Big Little Decoder behind the OpenAI API", lifespan=lifespan)
    app.state.bild = server
    install_handlers(app)
    app.add_middleware(_GateMiddleware, server=server, api_key=api_key)
    _add_routes(app, server)
    return app


def model_context_length(engine) -> int | None:
    """The smallest position limit of the pair's models, or None when they have none."""
    pair = getattr(engine, "pair", None)
    models = [model for model in (getattr(pair, "large", None), getattr(pair, "small", None)) if model is not None]
    limits = [getattr(loaded.model.config, "max_position_embeddings", None) for loaded in models]
    limits = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    return min(limits) if limits else None


class _GateMiddleware:
    """API-key check for /v1 routes (before the body is read, so a bad key is 401 whatever the body), a body whose
    Content-Length is over the limit refused before a byte of it is read, and request counting by route and status
    code. Plain ASGI, so streaming responses and disconnects pass through untouched. (A body without Content-Length
    is counted as it arrives by the routes' FastAPI `max_body_size`.)"""

    def __init__(self, app, server: _Server, api_key: str | None) -> None:
        self.app = app
        self.server = server
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = next((known for known in _ROUTES if path == known or path.startswith(known + "/")), "other")
        status, started, event_stream = 500, False, False

        async def send_counting(message) -> None:
            nonlocal status, started, event_stream
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                event_stream = dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream")
            await send(message)

        try:
            if self.api_key and path.startswith("/v1/") and not self._authorized(scope):
                message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                response = error_response(APIError(401, message, code="invalid_api_key"))
                await response(scope, receive, send_counting)
            elif _content_length(scope) > MAX_BODY_BYTES:
                await error_response(body_too_large())(scope, receive, send_counting)
            else:
                await self.app(scope, receive, send_counting)
        except asyncio.CancelledError:
            # The HTTP server's graceful-shutdown timeout ran out. `bild serve` ends requests before that (see
            # `_Server.begin_shutdown`), but a plain `uvicorn` does not tell the app it is stopping: end the answer
            # here instead of leaving the client a cut-off body, and say so in one line.
            logger.warning("shutting down: cancelled request %s %s", scope.get("method"), path)
            with contextlib.suppress(OSError):
                await _end_cancelled(scope, receive, send_counting, started, event_stream)
        finally:
            self.server.metrics.requests.labels(route, str(status)).inc()

    def _authorized(self, scope) -> bool:
        """'Authorization: Bearer <key>', the scheme in any case (RFC 7235)."""
        scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key)


def _content_length(scope) -> int:
    value = dict(scope["headers"]).get(b"content-length", b"0")
    return int(value) if value.isdigit() else 0


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry (another replica may answer)", code="shutting_down",
                    headers={"Retry-After": str(RETRY_AFTER_SHUTDOWN_S)})


async def _end_cancelled(scope, receive, send, started: bool, event_stream: bool) -> None:
    """Finish a response whose task was cancelled: 503 if nothing was sent, else the stream's error event."""
    error = _shutting_down()
    if not started:
        await error_response(error)(scope, receive, send)
    elif event_stream:
        last = _sse(error_body(error.status, error.message, error.param, error.code)) + _sse("[DONE]")
        await send({"type": "http.response.body", "body": last.encode(), "more_body": False})


def _add_routes(app: FastAPI, server: _Server) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.worker.alive
        body = {
            "status": "ok" if alive else "worker stopped",
            "model": server.model_name,
            "queue_depth": server.worker.depth,
            "queue_size": server.worker.queue_size,
        }
        if server.replica is not None:
            body["replica"] = server.replica
        return JSONResponse(body, 200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        server.metrics.queue_depth.set(server.worker.depth)
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        _check_model(server, model)
        return _model_card(server)

    @app.post("/v1/completions", max_body_size=MAX_BODY_BYTES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _serve(server, request, body, body.prompt_text, chat=False, route="/v1/completions")

    @app.post("/v1/chat/completions", max_body_size=MAX_BODY_BYTES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        messages = [message.as_template_message() for message in body.messages]
        return await _serve(server, request, body, messages, chat=True, route="/v1/chat/completions")


def _model_card(server: _Server) -> dict:
    pair = getattr(server.engine, "pair", None)
    return {
        "id": server.model_name,
        "object": "model",
        "created": server.created,
        "owned_by": "bild",
        "large": getattr(getattr(pair, "large", None), "name", None),
        "small": getattr(getattr(pair, "small", None), "name", None),
        "context_length": server.context_length,
    }


def _check_model(server: _Server, model: str) -> None:
    if model != server.model_name:
        message = f"model {model!r} does not exist; this server serves {server.model_name!r} (see GET /v1/models)"
        raise APIError(404, message, param="model", code="model_not_found")


async def _serve(
    server: _Server, request: Request, params: GenerationParams, prompt: str | list[dict], chat: bool, route: str
) -> Response:
    started = time.perf_counter()
    _check_model(server, params.model)
    prompt_param = "messages" if chat else "prompt"
    prompt_tokens = await _count_prompt_tokens(server, prompt, chat, prompt_param)
    config = _request_config(server, params, prompt_tokens)
    answer = _Answer(server, route, chat, prompt_tokens, config, started)
    job = Job(prompt=prompt, chat=chat, config=config, stops=list(params.stop or []), loop=asyncio.get_running_loop(),
              request_id=answer.id)
    try:
        server.worker.submit(job)
    except QueueFull as full:
        headers = {"Retry-After": str(full.retry_after_s)}
        raise APIError(429, f"{full}; at most {server.worker.queue_size} requests wait", code="queue_full", headers=headers)
    except WorkerClosed:
        raise _shutting_down() from None
    if params.stream:
        include_usage = bool(params.stream_options and params.stream_options.include_usage)
        return _JobStreamingResponse(
            _stream(server, job, answer, include_usage), on_close=partial(server.worker.cancel, job),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _complete(server, request, job, answer)


async def _count_prompt_tokens(server: _Server, prompt: str | list[dict], chat: bool, param: str) -> int:
    try:
        counted, complete = await run_in_threadpool(_count_tokens, server, prompt, chat)
        if counted > server.prompt_limit:
            raise _prompt_too_long(server, param, f"{counted}" if complete else f"more than {server.prompt_limit}")
        ids = await run_in_threadpool(server.engine.encode, prompt, chat)
    except APIError:
        raise
    except Exception as error:  # noqa: BLE001 -- tokenizing / chat templating failed on this input
        raise APIError(400, f"invalid {param}: {error}", param=param) from error
    if not ids:
        raise APIError(400, f"the {param} is empty after tokenization", param=param)
    if len(ids) > server.prompt_limit:
        raise _prompt_too_long(server, param, str(len(ids)))
    return len(ids)


def _count_tokens(server: _Server, prompt: str | list[dict], chat: bool) -> tuple[int, bool]:
    """(tokens, whether all were counted) of the prompt as the engine will see it, tokenizing no more of a huge
    prompt than a prefix that is already over the limit; (0, True) when the engine has no tokenizer to count with.

    Counting first keeps the cost of an over-long prompt bounded (9 MiB of prompt took 14-20 s and ~1 GB to tokenize
    whole) and refuses it before the engine's own context check, whose error has no OpenAI code."""
    tokenizer = getattr(server.engine, "tokenizer", None)
    if tokenizer is None or (chat and not getattr(tokenizer, "chat_template", None)):
        return 0, True  # the engine's encode() says what is wrong
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) if chat else prompt

    def count(part: str) -> int:
        return len(tokenizer(part, add_special_tokens=not chat)["input_ids"])

    head = text[: (server.prompt_limit + 1) * _CHARS_PER_TOKEN_BOUND]
    counted = count(head)
    if counted > server.prompt_limit or len(head) == len(text):
        return counted, len(head) == len(text)
    return count(text), True  # more than 16 characters a token (long runs of spaces or '#'): rare and cheap


def _prompt_too_long(server: _Server, param: str, tokens: str) -> APIError:
    if server.context_length is not None and server.prompt_limit == server.context_length - 1:
        why = f"this model's context is {server.context_length} tokens (leave room to generate)"
    else:
        why = f"this server takes prompts of at most {server.prompt_limit} tokens (bild serve --max-prompt-tokens)"
    what = "prompt" if param == "prompt" else "prompt the messages make"
    return APIError(400, f"the {what} is {tokens} tokens; {why}", param=param, code="context_length_exceeded")


def _request_config(server: _Server, params: GenerationParams, prompt_tokens: int) -> BiLDConfig:
    """The server defaults overridden by the request's fields; max_tokens checked against the context."""
    defaults, limit = server.defaults, server.context_length
    room = None if limit is None else limit - prompt_tokens
    if params.max_tokens is None:
        max_new_tokens = defaults.max_new_tokens if room is None else min(defaults.max_new_tokens, room)
    elif room is not None and params.max_tokens > room:
        message = (
            f"max_tokens is {params.max_tokens}, but the prompt is {prompt_tokens} tokens and this model's "
            f"context is {limit} tokens: at most {room} new tokens fit"
        )
        raise APIError(400, message, param="max_tokens", code="context_length_exceeded")
    else:
        max_new_tokens = params.max_tokens

    def pick(value, default):
        return default if value is None else value

    try:
        sampling = SamplingConfig(
            temperature=pick(params.temperature, defaults.sampling.temperature),
            top_p=pick(params.top_p, defaults.sampling.top_p),
            seed=pick(params.seed, defaults.sampling.seed),
        )
        return replace(
            defaults,
            fallback_threshold=pick(params.fallback_threshold, defaults.fallback_threshold),
            rollback_threshold=pick(params.rollback_threshold, defaults.rollback_threshold),
            max_small_steps=pick(params.max_small_steps, defaults.max_small_steps),
            repeat_ngram=pick(params.repeat_ngram, defaults.repeat_ngram),
            policy=pick(params.policy, defaults.policy),
            lookup=pick(params.lookup, defaults.lookup),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
        )
    except ValueError as error:  # the config's own checks; the schema should already have caught these
        raise APIError(400, str(error)) from error


@dataclass
class _Answer:
    """What every response of one request shares: ids, shapes and the bookkeeping of metrics."""

    server: _Server
    route: str
    chat: bool
    prompt_tokens: int
    config: BiLDConfig
    started: float
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    first_text_at: float | None = None

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def saw_text(self) -> None:
        if self.first_text_at is None:
            self.first_text_at = time.perf_counter()
            self.server.metrics.ttft.labels(self.route).observe(self.first_text_at - self.started)

    def done(self, finished: Finished | None) -> None:
        self.server.metrics.latency.labels(self.route).observe(time.perf_counter() - self.started)
        if finished is not None:
            self.server.metrics.record_generation(finished.completion_tokens, finished.stats)

    def usage(self, finished: Finished) -> dict:
        total = self.prompt_tokens + finished.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": finished.completion_tokens, "total_tokens": total}

    def bild(self, finished: Finished) -> dict:
        config = {
            "fallback_threshold": self.config.fallback_threshold,
            "rollback_threshold": _finite_or_str(self.config.rollback_threshold),
            "max_small_steps": self.config.max_small_steps,
            "repeat_ngram": self.config.repeat_ngram,
            "policy": self.config.policy,
            "lookup": self.config.lookup_ngram,
            "max_new_tokens": self.config.max_new_tokens,
            "temperature": self.config.sampling.temperature,
            "top_p": self.config.sampling.top_p,
            "seed": self.config.sampling.seed,
        }
        stats = {k: _finite_or_str(v) for k, v in finished.stats.as_dict().items()} if finished.stats else None
        return {"config": config, "stats": stats}

    def head(self, stream: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.server.model_name}

    def full(self, finished: Finished) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": finished.text}}
        else:
            choice = {"index": 0, "text": finished.text}
        choice |= {"logprobs": None, "finish_reason": finished.finish_reason}
        return self.head(stream=False) | {"choices": [choice], "usage": self.usage(finished), "bild": self.bild(finished)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        return self.head(stream=True) | {"choices": [choice]}


def _finite_or_str(value):
    """JSON has no infinity: alpha_RB = inf (never roll back) is sent as the string "inf"."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


async def _events(server: _Server, job: Job) -> AsyncIterator[TextDelta | Finished]:
    """The job's events until it finishes; a failure becomes an APIError. Cancels the job when left early."""
    try:
        while True:
            event = await job.events.get()
            if isinstance(event, Failed):
                raise _failure(event.error)
            yield event
            if isinstance(event, Finished):
                return
    finally:
        server.worker.cancel(job)  # no-op once finished; frees the slot when the client went away


def _failure(error: BaseException) -> APIError:
    if isinstance(error, WorkerClosed):
        return _shutting_down()
    if isinstance(error, ValueError):  # the engine refused the request's settings or prompt
        return APIError(400, str(error))
    return APIError(500, f"generation failed: {type(error).__name__}: {error}")


async def _complete(server: _Server, request: Request, job: Job, answer: _Answer) -> Response:
    """Wait for the whole answer, cancelling the job if the client disconnects meanwhile."""
    finished = None
    try:
        while finished is None:
            next_event = asyncio.ensure_future(job.events.get())
            while not next_event.done():
                await asyncio.wait({next_event}, timeout=_DISCONNECT_POLL_S)
                if not next_event.done() and await request.is_disconnected():
                    next_event.cancel()
                    return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
            event = next_event.result()
            if isinstance(event, Failed):
                raise _failure(event.error)
            if isinstance(event, TextDelta):
                answer.saw_text()
            else:
                finished = event
    finally:
        server.worker.cancel(job)  # no-op once finished; frees the slot when the client went away
        answer.done(finished)
    return JSONResponse(answer.full(finished))


class _JobStreamingResponse(StreamingResponse):
    """Cancels its job however the response ends, even when the client left before the first chunk was pulled
    (then the body generator never starts and its own `finally` never runs)."""

    def __init__(self, content, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, allow_nan=False)}\n\n"


async def _stream(server: _Server, job: Job, answer: _Answer, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of final text, a last chunk with finish_reason, usage and the `bild`
    statistics, then ``[DONE]``. Closing the stream (client gone) cancels the generation."""
    finished = None
    try:
        if answer.chat:
            yield _sse(answer.chunk(None, role=True))
        async for event in _events(server, job):
            if isinstance(event, TextDelta):
                answer.saw_text()
                yield _sse(answer.chunk(event.text))
            else:
                finished = event
        last = answer.chunk(None, finish_reason=finished.finish_reason)
        yield _sse(last | {"usage": answer.usage(finished), "bild": answer.bild(finished)})
        if include_usage:
            yield _sse(answer.head(stream=True) | {"choices": [], "usage": answer.usage(finished)})
    except APIError as error:  # headers are gone: report the failure in-band, as OpenAI does
        yield _sse(error_body(error.status, error.message, error.param, error.code))
    finally:
        answer.done(finished)
    yield _sse("[DONE]")
