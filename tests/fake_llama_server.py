"""A real local HTTP server that answers like llama.cpp's ``llama-server``.

The answers copy the JSON shapes recorded from a real llama-server (commit 0c1e570; see
``tests/fixtures/llama-server/``): ``/health``, ``/slots``, ``/slots/{id}?action=...``,
``/tokenize``, ``/detokenize``, ``/v1/chat/completions`` and ``/v1/embeddings``, with
the real server's quirks (slot ids taken modulo the slot count, ``n_prompt_tokens``
absent on a slot that never ran a task, 501 without ``--slot-save-path`` or
``--embeddings``, 400 with pooling ``none``).

Use it as a context manager::

    with FakeLlamaServer(n_slots=2, n_ctx=256, slot_save_path=tmp_path) as srv:
        client = LLMClient(LLMSettings(base_url=srv.url))
        ...
        assert srv.count("POST", "/slots/0") == 1

or through the ``fake_llama`` pytest fixture defined below (import it into a test
module). Failure modes for tests: :meth:`FakeLlamaServer.fail_next`, and
``srv.mode = "loading" | "slow" | "garbage" | "normal"``. Every request is recorded in
``srv.requests``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

import pytest

MODES = ("normal", "loading", "slow", "garbage")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}

_TOKEN_RE = re.compile(r"\s*(?:\w+|[^\w\s])")
_BOS = 1
_FILE_MAGIC = b"FAKE-LLAMA-SLOT\n"
_ILLEGAL_FILENAME_CHARS = set('/\\:*?"<>|')

# The "params" object of a slot that has run a task, as the real server reports it.
_SLOT_PARAMS: dict[str, Any] = {
    "seed": 4294967295,
    "temperature": 0.800000011920929,
    "dynatemp_range": 0.0,
    "dynatemp_exponent": 1.0,
    "top_k": 40,
    "top_p": 0.949999988079071,
    "min_p": 0.05000000074505806,
    "top_n_sigma": -1.0,
    "xtc_probability": 0.0,
    "xtc_threshold": 0.10000000149011612,
    "typical_p": 1.0,
    "repeat_last_n": 64,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "dry_multiplier": 0.0,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "dry_penalty_last_n": 64,
    "mirostat": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.10000000149011612,
    "adaptive_target": -1.0,
    "adaptive_decay": 0.8999999761581421,
    "max_tokens": -1,
    "n_predict": -1,
    "n_keep": 0,
    "n_discard": 0,
    "ignore_eos": False,
    "stream": False,
    "n_probs": 0,
    "min_keep": 0,
    "chat_format": "peg-native",
    "reasoning_format": "deepseek",
    "reasoning_in_content": False,
    "generation_prompt": "",
    "samplers": [
        "penalties",
        "dry",
        "top_n_sigma",
        "top_k",
        "typ_p",
        "top_p",
        "min_p",
        "xtc",
        "temperature",
    ],
    "speculative.types": "none",
    "timings_per_token": False,
    "post_sampling_probs": False,
    "backend_sampling": False,
    "lora": [],
}

_STOP_WORDS = frozenset(
    {
        "the", "and", "that", "this", "with", "from", "have", "will", "would", "could",
        "should", "there", "their", "what", "when", "where", "which", "about", "into",
        "your", "you", "are", "was", "were", "been", "please", "summarize", "above",
        "conversation", "now",
    }
)  # fmt: skip


@dataclass
class RecordedRequest:
    """One request as the fake server received it."""

    method: str
    path: str  # without the query string
    query: dict[str, str]
    raw_path: str  # with the query string
    body: Any  # decoded JSON; the raw text when it is not JSON; None when empty
    raw_body: bytes
    headers: dict[str, str]  # header names in lower case
    # The client's source port: one port means one kept-alive connection.
    client_port: int = 0


@dataclass
class _Slot:
    id: int
    n_ctx: int
    tokens: list[int] = field(default_factory=list)
    id_task: int | None = None
    is_processing: bool = False
    last_used: float = 0.0
    params: dict[str, Any] = field(default_factory=lambda: dict(_SLOT_PARAMS))
    n_prompt_tokens_cache: int = 0


@dataclass
class _Failure:
    status: int
    body: bytes
    content_type: str
    path: str | None


class _Streamed(Exception):
    """Raised inside a route to answer with server-sent events."""

    def __init__(self, events: list[bytes]) -> None:
        super().__init__("stream")
        self.events = events


def stream_events(answer: dict[str, Any]) -> list[bytes]:
    """A chat completion as llama-server streams it (``chat_stream.txt``): a role
    chunk, one chunk per token piece, a final chunk with ``finish_reason`` and
    ``timings``, then ``data: [DONE]``."""
    choice = answer["choices"][0]
    head = {
        "created": answer["created"],
        "id": answer["id"],
        "model": answer["model"],
        "system_fingerprint": answer["system_fingerprint"],
        "object": "chat.completion.chunk",
    }

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        chunk = {"choices": [{"finish_reason": finish, "index": 0, "delta": delta}]}
        chunk.update(head)
        chunk.update(extra)
        return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    events = [event({"role": "assistant", "content": None})]
    for index, call in enumerate(choice["message"].get("tool_calls") or []):
        # a tool call streams as its id and name, then its arguments in pieces
        head_delta = {"index": index, "id": call["id"], "type": "function"}
        head_delta["function"] = {"name": call["function"]["name"], "arguments": ""}
        events.append(event({"tool_calls": [head_delta]}))
        arguments = call["function"]["arguments"]
        for start in range(0, len(arguments), 7):
            piece = {"index": index, "function": {"arguments": arguments[start : start + 7]}}
            events.append(event({"tool_calls": [piece]}))
    text = choice["message"]["content"] or ""
    events += [event({"content": piece}) for _, piece in tokenize_text(text)]
    events.append(event({}, choice["finish_reason"], timings=answer["timings"]))
    events.append(b"data: [DONE]\n\n")
    return events


class _Answer(Exception):
    """Raised inside a route to answer at once (used for errors)."""

    def __init__(self, status: int, payload: Any) -> None:
        super().__init__(status)
        self.status = status
        self.payload = payload


def error_body(status: int, message: str, err_type: str | None = None) -> dict[str, Any]:
    """llama-server's error object."""
    return {
        "error": {
            "code": status,
            "message": message,
            "type": err_type or _ERROR_TYPES.get(status, "server_error"),
        }
    }


def tokenize_text(text: str) -> list[tuple[int, str]]:
    """Deterministic tokenization: words and single punctuation marks, with their pieces."""
    out = []
    for match in _TOKEN_RE.finditer(text):
        piece = match.group(0)
        out.append((3 + zlib.crc32(piece.strip().encode("utf-8")) % 31997, piece))
    return out


def validate_filename(name: str) -> bool:
    """An approximation of llama.cpp's ``fs_validate_filename`` (no sub-folders)."""
    if not name or len(name.encode("utf-8")) > 255:
        return False
    if any(c in _ILLEGAL_FILENAME_CHARS or ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return False
    return name == name.strip() and not name.endswith(".") and name not in (".", "..")


def embed_text(text: str, dim: int) -> list[float]:
    """A unit vector from hashed lower-case words: texts sharing words are similar."""
    vec = [0.0] * dim
    words = re.findall(r"\w+", text.lower()) or [p.strip() for _, p in tokenize_text(text)]
    for word in words:
        digest = hashlib.sha256(word.encode("utf-8")).digest()
        for k in range(4):
            idx = int.from_bytes(digest[4 * k : 4 * k + 3], "little") % dim
            sign = 1.0 if digest[4 * k + 3] & 1 else -1.0
            vec[idx] += sign / (k + 1)
    norm = sum(x * x for x in vec) ** 0.5
    if norm == 0.0:
        vec[0] = 1.0
        return vec
    return [x / norm for x in vec]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffer the answer so headers and body leave in one send (no Nagle stall).
    wbufsize = -1
    disable_nagle_algorithm = True
    server_version = "llama.cpp"
    sys_version = ""
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log lines."""

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        port = int(self.client_address[1])
        status, body, ctype = self.server.fake.handle(method, self.path, headers, raw, port)
        if isinstance(body, list):  # a streamed answer: server-sent events, chunked
            self._stream(status, body)
            return
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if status >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            self.close_connection = True

    def _stream(self, status: int, events: list[bytes]) -> None:
        """Send ``events`` as chunked ``text/event-stream``, one flush per event."""
        delay = self.server.fake.stream_delay
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("X-Accel-Buffering", "no")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            for event in events:
                if delay:
                    time.sleep(delay)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-stream
            self.close_connection = True

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    fake: FakeLlamaServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up early is not worth a traceback."""


class FakeLlamaServer:
    """A threaded llama-server look-alike on 127.0.0.1 and a free port."""

    def __init__(
        self,
        n_slots: int = 2,
        n_ctx: int = 256,
        slot_save_path: str | Path | None = None,
        embeddings: bool = True,
        embedding_dim: int = 384,
        pooling: str = "mean",
        *,
        model: str = "/srv/llm/tiny.gguf",
        api_key: str | None = None,
        embedding_max_tokens: int = 512,
        slow_seconds: float = 1.0,
        port: int = 0,
    ) -> None:
        self.n_slots = n_slots
        self.n_ctx = n_ctx
        self.slot_save_path = Path(slot_save_path) if slot_save_path is not None else None
        self.embeddings = embeddings
        self.embedding_dim = embedding_dim
        self.pooling = pooling
        self.model = model
        self.api_key = api_key
        self.embedding_max_tokens = embedding_max_tokens
        self.slow_seconds = slow_seconds
        self.mode = "normal"
        self.chat_reply: str | None = None  # force the assistant's text
        self.chat_delay = 0.0  # seconds a chat keeps its slot "is_processing"
        self.stream_delay = 0.0  # seconds before each event of a streamed reply
        # answer with these tool calls ({"id", "type", "function": {"name", "arguments"}}) instead of text
        self.chat_tool_calls: list[dict[str, Any]] | None = None
        self.requests: list[RecordedRequest] = []
        self._failures: list[_Failure] = []
        self._slots = [_Slot(id=i, n_ctx=n_ctx) for i in range(n_slots)]
        self._task_counter = 0
        self._vocab: dict[int, str] = {_BOS: "<s>"}
        self._lock = threading.RLock()
        self._httpd: _HTTPServer | None = None
        self._port: int | None = None
        self._bind_port = port  # 0: a free one
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Bind 127.0.0.1 on a free port (or the one given) and serve in a daemon thread."""
        httpd = _HTTPServer(("127.0.0.1", self._bind_port), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._port = int(httpd.server_address[1])
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port it listens on (kept after :meth:`stop`, for messages in tests)."""
        assert self._port is not None, "server not started"
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ test controls

    def fail_next(
        self,
        status: int,
        body: Any = None,
        count: int = 1,
        *,
        path: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests (whose path starts with ``path``, if given)
        with ``status`` and ``body`` (a dict/list as JSON, a str/bytes as is, None for
        llama-server's error object)."""
        if body is None:
            phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
            body = error_body(status, phrase or f"error {status}")
        if isinstance(body, (dict, list)):
            raw, ctype = json.dumps(body).encode(), "application/json; charset=utf-8"
        elif isinstance(body, str):
            raw, ctype = body.encode("utf-8"), "text/plain; charset=utf-8"
        else:
            raw, ctype = bytes(body), "application/octet-stream"
        with self._lock:
            self._failures.extend(_Failure(status, raw, ctype, path) for _ in range(count))

    def set_mode(self, mode: str, seconds: float | None = None) -> None:
        """Switch to ``normal``, ``loading`` (503 everywhere), ``slow`` (sleep
        ``seconds`` before every answer) or ``garbage`` (200 with a non-JSON body)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        if seconds is not None:
            self.slow_seconds = seconds

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """How many requests were received (matching the method and exact path, if given)."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method) and (path is None or r.path == path)
            )

    @property
    def request_count(self) -> int:
        """The number of requests received so far."""
        return len(self.requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self.requests.clear()

    def slot_tokens(self, slot_id: int) -> int:
        """The number of tokens held in slot ``slot_id`` (for assertions)."""
        with self._lock:
            return len(self._slots[slot_id].tokens)

    # ------------------------------------------------------------ dispatch

    def handle(
        self,
        method: str,
        raw_path: str,
        headers: dict[str, str],
        raw: bytes,
        client_port: int = 0,
    ) -> tuple[int, bytes | list[bytes], str]:
        """Answer one request: (status, body, content type); a streamed body is the
        list of its server-sent events."""
        parts = urlsplit(raw_path)
        path = parts.path
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        with self._lock:
            self.requests.append(
                RecordedRequest(method, path, query, raw_path, body, raw, headers, client_port)
            )
            mode = self.mode
            failure = None
            for i, fail in enumerate(self._failures):
                if fail.path is None or path.startswith(fail.path):
                    failure = self._failures.pop(i)
                    break
        if mode == "slow":
            time.sleep(self.slow_seconds)
        if failure is not None:
            return failure.status, failure.body, failure.content_type
        if mode == "loading":
            return self._json(503, error_body(503, "Loading model", "unavailable_error"))
        if mode == "garbage":
            return 200, b"<html><body>Bad Gateway</body></html>", "text/html"
        public = path in ("/health", "/v1/health", "/models", "/v1/models")
        authorized = headers.get("authorization") == f"Bearer {self.api_key}"
        if self.api_key is not None and not public and not authorized:
            return self._json(401, error_body(401, "Invalid API Key"))
        try:
            return self._json(200, self._route(method, path, query, raw))
        except _Answer as answer:
            return self._json(answer.status, answer.payload)
        except _Streamed as streamed:
            return 200, streamed.events, "text/event-stream"

    @staticmethod
    def _json(status: int, payload: Any) -> tuple[int, bytes, str]:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        return status, data.encode("utf-8"), "application/json; charset=utf-8"

    def _route(self, method: str, path: str, query: dict[str, str], raw: bytes) -> Any:
        if method == "GET" and path in ("/health", "/v1/health"):
            return {"status": "ok"}
        if method == "GET" and path == "/props":
            return self._props()
        if method == "GET" and path in ("/models", "/v1/models"):
            return self._models()
        if method == "GET" and path == "/slots":
            return self._slots_json()
        if method == "POST" and path.startswith("/slots/"):
            return self._slot_action(path[len("/slots/") :], query.get("action", ""), raw)
        if method == "POST" and path == "/tokenize":
            return self._tokenize(self._parse(raw))
        if method == "POST" and path == "/detokenize":
            return self._detokenize(self._parse(raw))
        if method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
            data = self._parse(raw)
            answer = self._chat(data)
            if isinstance(data, dict) and data.get("stream"):
                raise _Streamed(stream_events(answer))
            return answer
        if method == "POST" and path in ("/v1/embeddings", "/embeddings"):
            return self._embeddings(self._parse(raw))
        raise _Answer(404, error_body(404, "File Not Found"))

    @staticmethod
    def _parse(raw: bytes) -> Any:
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise _Answer(
                500,
                error_body(
                    500,
                    "[json.exception.parse_error.101] parse error at line 1, column 1: "
                    "syntax error while parsing value - invalid literal",
                ),
            ) from None

    def _tokens(self, text: str) -> list[int]:
        out = []
        for tid, piece in tokenize_text(text):
            self._vocab.setdefault(tid, piece)
            out.append(tid)
        return out

    # ------------------------------------------------------------ routes

    def _slots_json(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with self._lock:
            for slot in self._slots:
                item: dict[str, Any] = {
                    "id": slot.id,
                    "n_ctx": slot.n_ctx,
                    "speculative": False,
                    "is_processing": slot.is_processing,
                }
                if slot.id_task is not None:
                    item.update(
                        {
                            "id_task": slot.id_task,
                            "n_prompt_tokens": len(slot.tokens),
                            "n_prompt_tokens_processed": 0,
                            "n_prompt_tokens_cache": slot.n_prompt_tokens_cache,
                            "params": dict(slot.params),
                            "next_token": [
                                {
                                    "has_next_token": slot.is_processing,
                                    "has_new_line": False,
                                    "n_remain": -1,
                                    "n_decoded": 0,
                                }
                            ],
                        }
                    )
                out.append(item)
        return out

    def _props(self) -> dict[str, Any]:
        """The parts of ``GET /props`` a client reads: model path, slots and context."""
        return {
            "default_generation_settings": {"n_ctx": self.n_ctx, "params": dict(_SLOT_PARAMS)},
            "total_slots": self.n_slots,
            "model_path": self.model,
            "modalities": {"vision": False, "audio": False},
            "build_info": "b0-0c1e570",
        }

    def _models(self) -> dict[str, Any]:
        """``GET /v1/models``: the one loaded model."""
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "llamacpp",
                    "meta": {"n_ctx_train": self.n_ctx},
                }
            ],
        }

    def _slot_action(self, id_text: str, action: str, raw: bytes) -> Any:
        if self.slot_save_path is None:
            raise _Answer(
                501,
                error_body(
                    501,
                    "This server does not support slots action. Start it with `--slot-save-path`",
                ),
            )
        if not re.fullmatch(r"[+-]?\d+", id_text):
            raise _Answer(400, error_body(400, "Invalid slot ID"))
        id_slot = int(id_text)
        slot = self._slots[id_slot % self.n_slots]  # size_t arithmetic: -1 wraps too
        if action == "erase":
            with self._lock:
                n_erased = len(slot.tokens)
                slot.tokens = []
            return {"id_slot": id_slot, "n_erased": n_erased}
        if action not in ("save", "restore"):
            raise _Answer(400, error_body(400, "Invalid action"))
        data = self._parse(raw)
        if not isinstance(data, dict) or "filename" not in data:
            raise _Answer(
                500,
                error_body(500, "[json.exception.out_of_range.403] key 'filename' not found"),
            )
        filename = data["filename"]
        if not isinstance(filename, str):
            raise _Answer(
                500,
                error_body(500, "[json.exception.type_error.302] type must be string"),
            )
        if not validate_filename(filename):
            raise _Answer(400, error_body(400, "Invalid filename"))
        target = self.slot_save_path / filename
        if action == "save":
            with self._lock:
                tokens = list(slot.tokens)
            blob = _FILE_MAGIC + json.dumps({"n_tokens": len(tokens), "tokens": tokens}).encode()
            target.write_bytes(blob)
            return {
                "id_slot": id_slot,
                "filename": filename,
                "n_saved": len(tokens),
                "n_written": len(blob),
                "timings": {"save_ms": 0.161},
            }
        try:
            blob = target.read_bytes()
            if not blob.startswith(_FILE_MAGIC):
                raise ValueError("not a slot file")
            saved = json.loads(blob[len(_FILE_MAGIC) :])
            tokens = [int(t) for t in saved["tokens"]]
            if len(tokens) > slot.n_ctx:
                raise ValueError("does not fit")
        except (OSError, ValueError, KeyError, TypeError):
            raise _Answer(
                400,
                error_body(
                    400,
                    "Unable to restore slot: No available space in KV cache or invalid slot save file",
                ),
            ) from None
        with self._lock:
            slot.tokens = tokens
        return {
            "id_slot": id_slot,
            "filename": filename,
            "n_restored": len(tokens),
            "n_read": len(blob),
            "timings": {"restore_ms": 0.155},
        }

    def _tokenize(self, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("content"), str):
            raise _Answer(400, error_body(400, '"content" must be provided'))
        with self._lock:
            tokens = self._tokens(data["content"])
            pairs = [(t, self._vocab[t]) for t in tokens]
        if data.get("add_special"):
            pairs.insert(0, (_BOS, "<s>"))
        if data.get("with_pieces"):
            return {"tokens": [{"id": t, "piece": p} for t, p in pairs]}
        return {"tokens": [t for t, _ in pairs]}

    def _detokenize(self, data: Any) -> Any:
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list):
            raise _Answer(400, error_body(400, '"tokens" must be provided'))
        with self._lock:
            return {"content": "".join(self._vocab.get(int(t), "") for t in tokens)}

    def _prompt_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        tokens = [_BOS]
        for msg in messages:
            tokens += self._tokens(f"<|{msg.get('role', 'user')}|>")
            tokens += self._tokens(str(msg.get("content") or ""))
            tokens += self._tokens("<|end|>")
        tokens += self._tokens("<|assistant|>")
        return tokens

    def _reply_text(self, messages: list[dict[str, Any]]) -> str:
        if self.chat_reply is not None:
            return self.chat_reply
        convo = [m for m in messages if m.get("role") != "system"]
        counts: dict[str, int] = {}
        for msg in convo:
            for word in re.findall(r"[a-z0-9]{4,}", str(msg.get("content") or "").lower()):
                if word not in _STOP_WORDS:
                    counts[word] = counts.get(word, 0) + 1
        top = sorted(counts, key=lambda w: (-counts[w], w))[:8]
        topics = ", ".join(top) if top else "nothing notable"
        return f"Summary of {len(convo)} messages. Key topics: {topics}."

    def _choose_slot(self, data: dict[str, Any], prompt: list[int]) -> _Slot:
        id_slot = data.get("id_slot", -1)
        if isinstance(id_slot, int) and id_slot != -1:
            return self._slots[id_slot % self.n_slots]
        idle = [s for s in self._slots if not s.is_processing] or self._slots

        def similarity(slot: _Slot) -> float:
            return _common_prefix(slot.tokens, prompt) / max(len(prompt), 1)

        best = max(idle, key=similarity)
        if similarity(best) > 0.1:
            return best
        return min(idle, key=lambda s: s.last_used)

    def _chat(self, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise _Answer(400, error_body(400, "'messages' is required"))
        messages = [m for m in data["messages"] if isinstance(m, dict)]
        with self._lock:
            prompt = self._prompt_tokens(messages)
            if len(prompt) >= self.n_ctx:
                raise _Answer(
                    400,
                    {
                        "error": {
                            "code": 400,
                            "message": f"request ({len(prompt)} tokens) exceeds the "
                            f"available context size ({self.n_ctx} tokens), try "
                            "increasing it",
                            "type": "exceed_context_size_error",
                            "n_prompt_tokens": len(prompt),
                            "n_ctx": self.n_ctx,
                        }
                    },
                )
            slot = self._choose_slot(data, prompt)
            cached = min(_common_prefix(slot.tokens, prompt), len(prompt) - 1)
            self._task_counter += 1
            slot.id_task = self._task_counter
            slot.is_processing = True
            slot.tokens = list(prompt)
            slot.n_prompt_tokens_cache = cached
            reply = self._reply_text(messages)
            pieces = tokenize_text(reply)
            max_tokens = data.get("max_tokens", data.get("n_predict"))
            limit = self.n_ctx - len(prompt)
            if isinstance(max_tokens, int) and max_tokens >= 0:
                limit = min(limit, max_tokens)
            finish = "stop"
            if len(pieces) > limit:
                pieces, finish = pieces[:limit], "length"
            content = "".join(p for _, p in pieces) if finish == "length" else reply
            completion = [tid for tid, _ in pieces]
        if self.chat_delay:
            time.sleep(self.chat_delay)
        with self._lock:
            slot.tokens = prompt + completion[:-1]
            slot.is_processing = False
            slot.last_used = time.monotonic()
            params = dict(_SLOT_PARAMS)
            params["max_tokens"] = params["n_predict"] = max_tokens if isinstance(max_tokens, int) else -1
            for key in ("seed", "temperature", "top_k", "top_p", "min_p"):
                if isinstance(data.get(key), (int, float)):
                    params[key] = data[key]
            slot.params = params
        n_prompt, n_pred = len(prompt), len(completion)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.chat_tool_calls is not None:
            message = {"role": "assistant", "content": None, "tool_calls": self.chat_tool_calls}
            finish = "tool_calls"
        return {
            "choices": [
                {
                    "finish_reason": finish,
                    "index": 0,
                    "message": message,
                }
            ],
            "created": int(time.time()),
            "model": data.get("model") or self.model,
            "system_fingerprint": "b0-0c1e570",
            "object": "chat.completion",
            "usage": {
                "completion_tokens": n_pred,
                "prompt_tokens": n_prompt,
                "total_tokens": n_prompt + n_pred,
                "prompt_tokens_details": {"cached_tokens": cached},
            },
            "id": "chatcmpl-" + hashlib.sha256(repr(prompt).encode()).hexdigest()[:32],
            "timings": {
                "cache_n": cached,
                "prompt_n": n_prompt - cached,
                "prompt_ms": 1.0,
                "prompt_per_token_ms": 1.0 / max(n_prompt - cached, 1),
                "prompt_per_second": 1000.0 * max(n_prompt - cached, 1),
                "predicted_n": n_pred,
                "predicted_ms": 1.0,
                "predicted_per_token_ms": 1.0 / max(n_pred, 1),
                "predicted_per_second": 1000.0 * max(n_pred, 1),
            },
        }

    def _embeddings(self, data: Any) -> Any:
        if not self.embeddings:
            raise _Answer(
                501,
                error_body(
                    501,
                    "This server does not support embeddings. Start it with `--embeddings`",
                ),
            )
        if self.pooling == "none":
            raise _Answer(
                400,
                error_body(
                    400,
                    "Pooling type 'none' is not OAI compatible. Please use a different pooling type",
                ),
            )
        if not isinstance(data, dict) or "input" not in data:
            raise _Answer(400, error_body(400, '"input" must be provided'))
        inputs = data["input"]
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            raise _Answer(400, error_body(400, '"input" must be a string or a list of strings'))
        b64 = data.get("encoding_format") == "base64"
        items: list[dict[str, Any]] = []
        total = 0
        for index, text in enumerate(inputs):
            with self._lock:
                n_tokens = len(self._tokens(text)) + 1  # + BOS, like the real one
            if n_tokens <= 1:
                raise _Answer(400, error_body(400, "Input content cannot be empty"))
            if n_tokens > self.embedding_max_tokens:
                raise _Answer(
                    500,
                    error_body(
                        500,
                        f"input ({n_tokens} tokens) is too large to process. increase "
                        f"the physical batch size (current batch size: "
                        f"{self.embedding_max_tokens})",
                    ),
                )
            total += n_tokens
            vec = embed_text(text, self.embedding_dim)
            item: dict[str, Any]
            if b64:
                packed = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
                item = {
                    "embedding": packed,
                    "index": index,
                    "object": "embedding",
                    "encoding_format": "base64",
                }
            else:
                item = {"embedding": vec, "index": index, "object": "embedding"}
            items.append(item)
        return {
            "model": data.get("model") or self.model,
            "object": "list",
            "usage": {"prompt_tokens": total, "total_tokens": total},
            "data": items,
        }


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@pytest.fixture
def fake_llama(tmp_path: Path) -> Iterator[FakeLlamaServer]:
    """A started FakeLlamaServer with 2 slots of 256 tokens and a slot save folder."""
    save = tmp_path / "slots"
    save.mkdir()
    with FakeLlamaServer(slot_save_path=save) as srv:
        yield srv
