"""The HTTP client to the model server: chat (whole or streamed) and pass-through.

Failures become :class:`UpstreamError` carrying the status and OpenAI-style body the
client gets: unreachable 502 ``upstream_unreachable``, timed out 504 ``upstream_timeout``,
loading 503 ``upstream_unavailable``, any other 5xx (or a broken or malformed answer)
502 ``upstream_error``, a 4xx passed through as the upstream sent it. An over-long prompt (llama-server's 400
``exceed_context_size_error``, or the 500 form some builds send) is
:class:`ContextExceededError`, so the turn can clear and retry. The API key is sent,
never put in a message. Requests go over kept-alive ``http.client`` connections
(``llm.keepalive``): on the path of every turn, ``requests`` cost four times the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from kvcache_cli.llm.keepalive import KeepAlivePool, Reply, Streamed, TransportError
from kvcache_cli.server.protocol import error_body

_CONTEXT_MARKERS = ("exceed_context_size_error", "exceeds the available context size", "context size")
SSE_DONE = b"data: [DONE]"


class UpstreamError(Exception):
    """The upstream failed: ``status`` and ``body`` are what the client is answered."""

    def __init__(self, status: int, body: dict[str, Any], reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.body = body
        self.reason = reason  # a short label for logs and metrics: unreachable, timeout, http_502...


class ContextExceededError(UpstreamError):
    """The upstream refused the prompt as longer than its context."""


class Upstream:
    """One model server at ``base_url`` (``http://host:port``, no ``/v1``)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = KeepAlivePool(self.base_url, headers, connect_timeout, read_timeout)

    def close(self) -> None:
        self._http.close()

    # ---------------------------------------------------------------- plumbing
    def _send(self, method: str, path: str, body: bytes | None, stream: bool = False) -> Reply | Streamed:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            if stream:
                return self._http.open(method, path, body, headers)
            return self._http.request(method, path, body, headers)
        except TransportError as exc:
            if exc.timed_out:
                raise UpstreamError(
                    504,
                    error_body(
                        504, f"the upstream did not answer {method} {path} in time", "upstream_timeout"
                    ),
                    "timeout",
                ) from None
            raise UpstreamError(
                502,
                error_body(502, f"cannot reach the upstream for {method} {path}", "upstream_unreachable"),
                "unreachable",
            ) from None

    @staticmethod
    def _check(status: int, content: bytes, what: str) -> None:
        """Raise the client-facing error for a non-2xx answer."""
        if status < 400:
            return
        text = content.decode("utf-8", "replace")
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        lowered = text.lower()
        if status in (400, 500) and any(m in lowered for m in _CONTEXT_MARKERS):
            raise ContextExceededError(
                400,
                body if isinstance(body, dict) else error_body(400, text[:300], "context_length_exceeded"),
                "context_exceeded",
            )
        if status < 500:  # the client's mistake: passed through as sent
            raise UpstreamError(
                status,
                body if isinstance(body, dict) else error_body(status, text[:300], "upstream_rejected"),
                f"http_{status}",
            )
        answered = 503 if status == 503 else 502
        detail = body.get("error", {}).get("message") if isinstance(body, dict) else None
        message = f"the upstream answered {what} with HTTP {status}"
        if isinstance(detail, str) and detail:
            message += f": {detail[:300]}"
        code = "upstream_unavailable" if answered == 503 else "upstream_error"
        raise UpstreamError(answered, error_body(answered, message, code), f"http_{status}")

    # ---------------------------------------------------------------- chat
    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """A whole (non-streamed) chat completion."""
        reply = self._send("POST", "/v1/chat/completions", json.dumps(body).encode())
        assert isinstance(reply, Reply)
        self._check(reply.status, reply.content, "POST /v1/chat/completions")
        try:
            data = json.loads(reply.content)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise UpstreamError(
                502,
                error_body(502, "the upstream's chat answer is not a chat completion", "upstream_error"),
                "malformed",
            )
        return data

    def chat_stream(self, body: dict[str, Any]) -> ChatStream:
        """Open a streamed chat completion; errors before the first event raise here."""
        resp = self._send("POST", "/v1/chat/completions", json.dumps(body).encode(), stream=True)
        assert isinstance(resp, Streamed)
        if resp.status >= 400:
            try:
                content = resp.read_all()
            except TransportError:
                content = b""
            self._check(resp.status, content, "POST /v1/chat/completions")
        return ChatStream(resp)

    # ---------------------------------------------------------------- pass-through
    def forward(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes, str]:
        """Any other endpoint: (status, body, content type) as the upstream answered,
        except that unreachable/timeout/5xx become kvcache's 502/503/504 errors."""
        reply = self._send(method, path, body)
        assert isinstance(reply, Reply)
        if reply.status >= 500:
            self._check(reply.status, reply.content, f"{method} {path}")
        return reply.status, reply.content, reply.header("Content-Type", "application/json")

    def get_json(self, path: str) -> Any:
        """``GET path`` decoded, or None when it fails (for optional facts like ``/props``)."""
        try:
            reply = self._send("GET", path, None)
            assert isinstance(reply, Reply)
            return json.loads(reply.content) if reply.status == 200 else None
        except (UpstreamError, ValueError):
            return None


class ChatStream:
    """The server-sent events of a streamed chat, one event (bytes, ending in a blank
    line) at a time as they arrive, with the reply text and last ``timings`` gathered."""

    def __init__(self, resp: Streamed) -> None:
        self._resp = resp
        self.content: list[str] = []
        self.timings: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.done = False  # the upstream sent ``[DONE]``
        self.reasoned = False  # it streamed reasoning besides the content
        self._calls: dict[int, dict[str, Any]] = {}  # streamed tool calls by index

    def __iter__(self) -> Iterator[bytes]:
        buffer = b""
        try:
            for piece in self._resp:
                buffer += piece
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    event = event.strip(b"\r\n")
                    if event:
                        self._note(event)
                        yield event + b"\n\n"
        except TransportError:
            raise UpstreamError(
                502, error_body(502, "the upstream's stream broke off", "upstream_error"), "stream_broken"
            ) from None
        if buffer.strip():
            self._note(buffer.strip())
            yield buffer.strip() + b"\n\n"

    def _note(self, event: bytes) -> None:
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                continue
            if not isinstance(chunk, dict):
                continue
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str):
                    self.content.append(delta["content"])
                if delta.get("reasoning_content"):
                    self.reasoned = True
                for call in delta.get("tool_calls") or []:
                    if isinstance(call, dict):
                        self._add_call(call)
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
            if isinstance(chunk.get("timings"), dict):
                self.timings = chunk["timings"]
            if isinstance(chunk.get("usage"), dict):
                self.usage = chunk["usage"]

    def _add_call(self, delta: dict[str, Any]) -> None:
        """Join a streamed tool call's pieces (its ``arguments`` arrive in fragments)."""
        index = delta.get("index", 0) if isinstance(delta.get("index"), int) else 0
        call = self._calls.setdefault(
            index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if delta.get("id"):
            call["id"] = delta["id"]
        function = delta.get("function") or {}
        if isinstance(function.get("name"), str):
            call["function"]["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            call["function"]["arguments"] += function["arguments"]

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [self._calls[i] for i in sorted(self._calls)]

    @property
    def text(self) -> str:
        return "".join(self.content)

    def close(self) -> None:
        self._resp.close()
