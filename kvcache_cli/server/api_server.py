"""The FastAPI app of ``kvcache serve`` and the uvicorn run loop.

Routes: ``POST /v1/chat/completions`` (managed, see ``serving_chat``), pass-through
``GET /v1/models``, ``POST /v1/embeddings`` (to ``[llm] embeddings_url`` when that is
set), ``POST /tokenize``, ``POST /detokenize``, and kvcache's own ``GET /health`` and
``GET /metrics``. Every error is an OpenAI-style body with a stable ``code``. Endpoints
run the synchronous core in the thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvcache_cli.errors import BadInputError, KVCacheError
from kvcache_cli.server.metrics import CONTENT_TYPE, Metrics
from kvcache_cli.server.protocol import ChatCompletionRequest, describe_validation_error, error_body
from kvcache_cli.server.serving_chat import ChatService
from kvcache_cli.server.turn_state import ServeError, TurnResult
from kvcache_cli.server.upstream import Upstream, UpstreamError

PUBLIC_PATHS = ("/health",)
CUT_OFF = "cut off: still running when the stop's grace ended"
BRIEF_FACTS = ("session", "turn", "action", "tokens", "error")  # the log line without -v
PASS_THROUGH = {
    ("GET", "/v1/models"),
    ("POST", "/v1/embeddings"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
}


@dataclass
class AppSettings:
    """What the routes need besides the chat service."""

    api_key: str | None = None  # the key clients must present (its value), or None
    max_body_bytes: int = 8 * 1024 * 1024
    verbose: int = 0
    quiet: bool = False
    store_label: str = ""


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status)


TOLD_KEPT = 1000  # distinct notices remembered, so a repeated one is told once


class _Log:
    """One line per request on stderr (``-q`` silences it, ``-v`` adds detail), after
    one ``kvcache serve: <session>: <notice>`` line per notice of the core's in its
    turn (the summary fell back to the extractive one...). A notice told before in the
    same words (an upstream without embeddings says so for every new session) is not
    repeated unless ``-v``; the trace keeps every turn's notices."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._told: OrderedDict[str, None] = OrderedDict()

    def _new(self, notices: list[str]) -> list[str]:
        if self.settings.verbose:
            return notices
        fresh = [n for n in notices if n not in self._told]
        for notice in fresh:
            self._told[notice] = None
            if len(self._told) > TOLD_KEPT:
                self._told.popitem(last=False)
        return fresh

    def request(self, method: str, path: str, status: int, seconds: float, facts: dict[str, Any]) -> None:
        if self.settings.quiet:
            return
        shown = {
            k: v for k, v in facts.items() if k != "notices" and (self.settings.verbose or k in BRIEF_FACTS)
        }
        extra = " ".join(f"{k}={v}" for k, v in shown.items() if v is not None)
        line = f"{method} {path} {status} {seconds * 1000:.0f}ms" + (f" {extra}" if extra else "")
        with self._lock:
            notices = self._new(list(facts.get("notices") or ()))
            told = "".join(f"kvcache serve: {facts.get('session')}: {n}\n" for n in notices)
            sys.stderr.write(told + line + "\n")
            sys.stderr.flush()


def _stream_in_threads(events: Iterator[bytes]) -> AsyncIterator[bytes]:
    """An async view of a blocking event iterator: each step runs in the thread pool;
    when the client goes away, the iterator is closed once no step is running, so
    its ``finally`` (release the session, keep the store consistent) always runs."""
    busy = threading.Lock()
    end = object()

    def step() -> Any:
        with busy:
            return next(events, end)

    def close() -> None:
        with busy:
            close_events = getattr(events, "close", None)
            if close_events is not None:
                close_events()

    async def relay() -> AsyncIterator[bytes]:
        try:
            while True:
                chunk = await run_in_threadpool(step)
                if chunk is end:
                    break
                yield chunk
        finally:
            # the client went away: this task is being cancelled, so shield the close
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(close)

    return relay()


class _AnswerThenEnd(JSONResponse):
    """A turn's JSON answer; once it is sent (or failed to be), the turn's ``after``
    runs in the thread pool (see ``TurnResult``): the client does not wait for it."""

    def __init__(self, content: Any, headers: dict[str, str], after: Callable[[], None]) -> None:
        super().__init__(content, headers=headers)
        self._after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # the session's lock is released in any case
                await run_in_threadpool(self._after)


def create_app(
    service: ChatService,
    upstream: Upstream,
    metrics: Metrics,
    settings: AppSettings,
    embeddings: Upstream | None = None,
) -> FastAPI:
    """The app: routes over ``service`` (chat) and ``upstream`` (pass-through);
    ``embeddings``, when given, answers ``POST /v1/embeddings`` instead of ``upstream``."""
    app = FastAPI(title="kvcache serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, settings=settings, metrics=metrics, log=_Log(settings))

    async def chat_completions(request: Request) -> Response:
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            return _error(
                413, f"request body is larger than {settings.max_body_bytes} bytes", "request_too_large"
            )
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"the request body is not valid JSON ({exc})", "invalid_json")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object", "invalid_json")
        try:
            chat = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            return _error(400, describe_validation_error(exc.errors()), "invalid_request")
        hint = request.headers.get("x-session-id")
        try:
            result: TurnResult = await run_in_threadpool(service.handle, chat, body, hint)
        except ServeError as exc:
            request.state.facts = {**exc.log, "error": exc.reason or None}
            return JSONResponse(exc.body, status_code=exc.status)
        except BadInputError as exc:
            return _error(400, str(exc), "invalid_request")
        except KVCacheError as exc:
            return _error(500, f"kvcache: {exc}", "store_error")
        request.state.facts = result.log or {"session": result.headers.get("X-KVCache-Session")}
        if result.stream is not None:
            return StreamingResponse(
                _stream_in_threads(result.stream),
                media_type="text/event-stream",
                headers={**result.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        if result.after is None:
            return JSONResponse(result.body, headers=result.headers)
        try:
            return _AnswerThenEnd(result.body, result.headers, result.after)
        except BaseException:
            await run_in_threadpool(result.after)
            raise

    async def pass_through(request: Request) -> Response:
        raw = await request.body()
        path = request.url.path
        target = embeddings if embeddings is not None and path == "/v1/embeddings" else upstream
        try:
            status, content, ctype = await run_in_threadpool(
                target.forward, request.method, path, raw or None
            )
        except UpstreamError as exc:
            metrics.upstream_errors.labels(exc.reason).inc()
            return JSONResponse(exc.body, status_code=exc.status)
        return Response(content, status_code=status, media_type=ctype)

    for method, path in sorted(PASS_THROUGH):
        app.add_route(path, pass_through, methods=[method], include_in_schema=False)

    async def health(request: Request) -> Response:
        def probe() -> dict[str, Any]:
            upstream_health = upstream.get_json("/health")
            ok = isinstance(upstream_health, dict) and upstream_health.get("status") == "ok"
            return {
                "status": "ok" if ok else "degraded",
                "kvcache": {
                    "status": "ok",
                    "store": settings.store_label,
                    "n_ctx": service.n_ctx,
                    "turns_in_progress": service.locks.in_progress,
                },
                "upstream": {"url": upstream.base_url, "status": "ok" if ok else "unavailable"},
            }

        data = await run_in_threadpool(probe)
        return JSONResponse(data, status_code=200 if data["status"] == "ok" else 503)

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # plain Starlette routes: each reads its own request, so FastAPI's parameter and
    # dependency machinery would only add work (about 0.15-0.2 ms of CPU a request)
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/metrics", metrics_route, methods=["GET"])

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"no route {request.method} {request.url.path}", "not_found")

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc: Exception) -> Response:
        return _error(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # a bug, not bad input: the client still gets the API's error shape (Starlette's
        # outermost middleware sends this, then re-raises so the traceback is logged once)
        return _error(500, f"kvcache: internal error ({type(exc).__name__})", "internal_error")

    return app


class Guard:
    """ASGI middleware around every request: the API key, the body size limit, the
    request's metrics and its log line (written when the response, a stream included,
    has ended). Plain ASGI, so a streamed response is passed on untouched."""

    def __init__(self, app: ASGIApp, settings: AppSettings, metrics: Metrics, log: _Log) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        status = [500]
        begun: list[bool] = []  # the response's status line went out
        sent: list[float] = []  # when the response's last byte went (a turn may go on after it)

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                begun.append(True)
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                sent.append(time.perf_counter())

        try:
            refused = self._refusal(path, headers)
            if refused is not None:
                await refused(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            # only uvicorn cancels a request's task: at a stop, when the grace is over. The
            # turn's own clean-up has run (a stream's reply is not stored); end the answer
            # and say so on the request's line instead of a traceback.
            scope.setdefault("state", {}).setdefault("facts", {})["error"] = CUT_OFF
            with contextlib.suppress(Exception):
                if not begun:
                    await _error(503, "kvcache serve stopped before the answer came", "shutting_down")(
                        scope, receive, send_and_note
                    )
                elif not sent:
                    await send_and_note({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            seconds = (sent[0] if sent else time.perf_counter()) - started
            route = path if path in _KNOWN_ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(seconds)
            facts = scope.get("state", {}).get("facts") or {}
            self.log.request(method, path, status[0], seconds, facts)

    def _refusal(self, path: str, headers: dict[str, str]) -> JSONResponse | None:
        key = self.settings.api_key
        if (
            key is not None
            and path not in PUBLIC_PATHS
            and not _authorized(headers.get("authorization", ""), key)
        ):
            return _error(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            return _error(
                413, f"request body is larger than {self.settings.max_body_bytes} bytes", "request_too_large"
            )
        return None


_KNOWN_ROUTES = {"/v1/chat/completions", "/health", "/metrics"} | {p for _, p in PASS_THROUGH}


def _authorized(header: str, key: str) -> bool:
    """``Bearer <key>``, compared in constant time."""
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), key.encode())
