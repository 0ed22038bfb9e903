"""HTTP client for llama.cpp's ``llama-server`` and other OpenAI-compatible servers.

One :class:`LLMClient` holds keep-alive connections (``llm.keepalive``, on the standard
library's ``http.client``: a quarter of the CPU ``requests`` took per call) and offers the calls
kvcache needs: health, chat completions (summaries: ``llm/summarize.py``), embeddings, token counts, and the
slot API of ``llama-server`` (``GET /slots``, ``POST /slots/{id}?action=save|restore|erase``).

Behaviour shared by every call:

- connect and read timeouts; a bounded retry with exponential backoff on connection
  errors, timeouts and 5xx answers (503 "Loading model" included, 501 excluded since it
  never changes); no retry on 4xx;
- every failure becomes one :class:`~kvcache_cli.errors.ServerError` whose message names
  the server (URL without credentials, query or fragment), the request and the cause,
  with a hint for the known misconfigurations (no ``--slot-save-path``, no
  ``--embeddings``, pooling ``none``);
- the API key is read from the environment variable named by
  :attr:`LLMSettings.api_key_env`, sent as ``Authorization: Bearer ...`` and never put in
  a message, a log line or a ``repr``;
- slot ids are checked against ``GET /slots`` before any slot action, because the server
  silently takes them modulo its slot count.

Importing this module stays cheap for CLI start-up (no HTTP library beyond the
standard one).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self, TypeGuard
from urllib.parse import urlsplit, urlunsplit

from kvcache_cli.config import LLMConfig
from kvcache_cli.errors import BadInputError, ConfigError, ServerError
from kvcache_cli.llm.keepalive import KeepAlivePool, Reply, TransportError

__all__ = [
    "EmbeddingBatch",
    "LLMClient",
    "LLMSettings",
    "SlotInfo",
    "SlotRestoreResult",
    "SlotSaveResult",
    "make_slot_filename",
    "validate_slot_filename",
]

log = logging.getLogger(__name__)

_TOKENIZE_CACHE_SIZE = 4096
_FILENAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_MAX_FILENAME_LEN = 200
_ERROR_SNIPPET = 300

_CONFIG_DEFAULTS = LLMConfig()


@dataclass
class LLMSettings:
    """Where the LLM server is and how to talk to it.

    ``api_key_env`` is the *name* of an environment variable holding the key, never the
    key itself, so this object is safe to print.
    """

    base_url: str | None = None
    embeddings_url: str | None = None
    api_key_env: str | None = None
    # the numbers' defaults are the config's ([llm] in kvcache.toml), stated once there
    model: str = _CONFIG_DEFAULTS.model
    embedding_model: str | None = None
    connect_timeout: float = _CONFIG_DEFAULTS.connect_timeout
    read_timeout: float = _CONFIG_DEFAULTS.read_timeout
    retries: int = _CONFIG_DEFAULTS.retries
    backoff: float = _CONFIG_DEFAULTS.backoff
    summary_max_tokens: int = _CONFIG_DEFAULTS.summary_max_tokens
    embedding_batch_size: int = _CONFIG_DEFAULTS.embedding_batch_size

    def __post_init__(self) -> None:
        if self.embeddings_url is None:
            self.embeddings_url = self.base_url


@dataclass(frozen=True)
class SlotInfo:
    """One slot of ``GET /slots``; ``n_prompt_tokens`` is None on a slot that never ran."""

    id: int
    n_ctx: int
    n_prompt_tokens: int | None
    is_processing: bool


@dataclass(frozen=True)
class SlotSaveResult:
    """The answer to ``POST /slots/{id}?action=save``."""

    filename: str
    n_saved: int
    n_written: int


@dataclass(frozen=True)
class SlotRestoreResult:
    """The answer to ``POST /slots/{id}?action=restore``."""

    filename: str
    n_restored: int
    n_read: int


@dataclass(frozen=True)
class EmbeddingBatch:
    """Vectors in the order of the input texts, the model that made them, their size."""

    vectors: list[list[float]]
    model: str
    dim: int


def _normalize_base_url(url: str, what: str) -> str:
    """Validate an http(s) URL and drop a trailing ``/`` and a trailing ``/v1``."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} must be an http:// or https:// URL with a host")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _display_url(url: str) -> str:
    """The URL as shown in messages: no user/password, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def validate_slot_filename(filename: str) -> str:
    """Return ``filename`` if it is a safe slot file name, else raise BadInputError.

    Allowed: ``[A-Za-z0-9._-]`` only, at most 200 characters, no leading dot, no ``..``.
    """
    if (
        not isinstance(filename, str)
        or not _FILENAME_RE.fullmatch(filename)
        or filename.startswith(".")
        or ".." in filename
        or len(filename) > _MAX_FILENAME_LEN
    ):
        raise BadInputError(
            f"invalid slot file name {filename!r}: use only letters, digits, '.', '_' "
            f"and '-', no leading dot, no '..', at most {_MAX_FILENAME_LEN} characters"
        )
    return filename


def make_slot_filename(session_key: str, snapshot_hint: str = "") -> str:
    """A fresh, safe slot file name for a session.

    Shape: ``kvcache-<sha256(session)[:16]>-<UTC YYYYmmddTHHMMSSZ>-<8 random hex>[-<hint>].bin``
    where ``<hint>`` keeps only the ASCII letters and digits of ``snapshot_hint`` (at most
    24), so nothing the user typed reaches the name unchecked.
    """
    digest = hashlib.sha256(session_key.encode("utf-8")).hexdigest()[:16]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    hint = re.sub(r"[^A-Za-z0-9]", "", snapshot_hint)[:24]
    name = f"kvcache-{digest}-{stamp}-{secrets.token_hex(4)}"
    if hint:
        name += f"-{hint}"
    return validate_slot_filename(name + ".bin")


_REASONS = {
    "refused": "connection refused",
    "dns": "host name does not resolve",
    "reset": "connection reset by the server",
    "closed": "the server closed the connection without answering",
}


def _status_reason(exc: TransportError) -> str:
    """A short, credential-free description of a connection failure."""
    return _REASONS.get(exc.kind, f"connection failed ({exc.kind})")


class LLMClient:
    """A client for one llama-server (or OpenAI-compatible server).

    Use as a context manager or call :meth:`close` to release the keep-alive connections.
    """

    def __init__(self, settings: LLMSettings) -> None:
        self.settings = settings
        if settings.base_url is None and settings.embeddings_url is None:
            raise ConfigError("no LLM server configured: set the server's base URL")
        self._base = (
            _normalize_base_url(settings.base_url, "the LLM server URL")
            if settings.base_url is not None
            else None
        )
        self._emb_base = (
            _normalize_base_url(settings.embeddings_url, "the embeddings server URL")
            if settings.embeddings_url is not None
            else self._base
        )
        if settings.retries < 0:
            raise ConfigError("retries must be 0 or more")
        if settings.embedding_batch_size < 1:
            raise ConfigError("embedding_batch_size must be 1 or more")
        if settings.connect_timeout <= 0 or settings.read_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        self._pools: dict[str, KeepAlivePool] = {}
        for base in (self._base, self._emb_base):
            if base and base not in self._pools:
                self._pools[base] = KeepAlivePool(
                    base, {"Accept": "application/json"}, settings.connect_timeout, settings.read_timeout
                )
        self._token_cache: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- plumbing

    def __repr__(self) -> str:
        shown = _display_url(self._base) if self._base else None
        return f"LLMClient(base_url={shown!r}, model={self.settings.model!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the kept-alive connections."""
        for pool in self._pools.values():
            pool.close()

    def _server_label(self, base: str) -> str:
        return f"llama-server at {_display_url(base)}"

    def _require_base(self) -> str:
        if self._base is None:
            raise ConfigError("no LLM server base URL configured")
        return self._base

    def _api_key(self) -> str | None:
        name = self.settings.api_key_env
        if not name:
            return None
        value = os.environ.get(name)
        if not value:
            raise ConfigError(f"the API key variable {name} is not set in the environment")
        return value

    def _scrub(self, text: str) -> str:
        """Remove the API key from a text, in case a server echoed it back."""
        try:
            key = self._api_key()
        except ConfigError:
            key = None
        if key:
            text = text.replace(key, "***")
        return text

    def _fail(self, message: str, status: int | None = None) -> ServerError:
        return ServerError(self._scrub(message), status)

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        base: str | None = None,
        context: str = "",
    ) -> Any:
        """Send one request with retries; return the decoded JSON answer.

        ``context`` names the kind of call ("slots-action", "embeddings", ...) so the
        error message can add the right hint.
        """
        base = base if base is not None else self._require_base()
        pool = self._pools[base]
        label = self._server_label(base)
        what = f"{method} {path}"
        headers: dict[str, str] = {}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        payload = None
        if body is not None:
            try:
                payload = json.dumps(body, allow_nan=False).encode()
            except ValueError:
                raise self._fail(f"{label}: {what} failed: the request is not valid JSON") from None
            headers["Content-Type"] = "application/json"
        attempts = self.settings.retries + 1
        failure = ""
        for attempt in range(attempts):
            if attempt:
                delay = self.settings.backoff * (2 ** (attempt - 1))
                log.debug("%s: retrying %s in %.2fs (%s)", label, what, delay, failure)
                time.sleep(delay)
            tried = f" (tried {attempt + 1} times)" if attempt else ""
            try:
                resp = pool.request(method, path, payload, headers)
            except TransportError as exc:
                if exc.kind == "connect_timeout":
                    failure = (
                        f"cannot connect to {label}: {what}: connect timed out after "
                        f"{self.settings.connect_timeout:g}s"
                    )
                elif exc.kind == "read_timeout":
                    failure = (
                        f"{label}: {what} failed: no answer within the read timeout of "
                        f"{self.settings.read_timeout:g}s"
                    )
                else:
                    failure = f"cannot connect to {label}: {what}: {_status_reason(exc)}"
                continue
            status = resp.status
            if status >= 500 and status != 501:
                failure = self._http_failure(label, what, resp, context)
                continue
            if status >= 300:
                raise self._fail(self._http_failure(label, what, resp, context) + tried, status)
            try:
                return json.loads(resp.content)
            except ValueError:
                ctype = resp.header("Content-Type", "?")
                raise self._fail(
                    f"{label}: {what} answered with invalid JSON "
                    f"(status {status}, {ctype}, {len(resp.content)} bytes)"
                ) from None
        suffix = f" (tried {attempts} times)" if attempts > 1 else ""
        raise self._fail(failure + suffix)

    def _http_failure(self, label: str, what: str, resp: Reply, context: str) -> str:
        """Describe an HTTP error answer in one line, with a hint when one is known."""
        status = resp.status
        err_type = ""
        message = ""
        try:
            data = json.loads(resp.content)
        except ValueError:
            data = None
        if isinstance(data, Mapping) and isinstance(data.get("error"), Mapping):
            err = data["error"]
            err_type = str(err.get("type") or "")
            message = str(err.get("message") or "")
        elif isinstance(data, Mapping) and isinstance(data.get("error"), str):
            message = data["error"]
        else:
            message = resp.text
        message = " ".join(message.split())[:_ERROR_SNIPPET]
        detail = " ".join(part for part in (str(status), err_type) if part)
        if message:
            detail = f"{detail}: {message}" if err_type else f"{detail} {message}"
        text = f"{label}: {what} failed: {detail}"
        hint = _hint(status, context, message)
        if hint:
            text += f" ({hint})"
        return text

    # --------------------------------------------------------------- endpoints

    def health(self) -> dict[str, Any]:
        """``GET /health``: ``{"status": "ok"}`` when the model is loaded."""
        data = self._request("GET", "/health", context="health")
        if not isinstance(data, dict):
            raise self._malformed("GET /health", "expected a JSON object")
        return data

    def _malformed(self, what: str, why: str, base: str | None = None) -> ServerError:
        label = self._server_label(base or self._base or "")
        return self._fail(f"{label}: {what} gave an unexpected answer: {why}")

    def chat(
        self,
        messages: list[dict[str, str]],
        max_tokens: int | None = None,
        temperature: float = 0.2,
        *,
        slot_id: int | None = None,
    ) -> str:
        """``POST /v1/chat/completions`` (non-streaming); return the reply text.

        ``slot_id`` pins the request to one llama-server slot (checked first) so the
        conversation's KV cache lands there.
        """
        payload: dict[str, Any] = {
            "model": self.settings.model,
            "messages": messages,
            "temperature": temperature,
            "stream": False,
        }
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if slot_id is not None:
            self.check_slot(slot_id)
            payload["id_slot"] = slot_id
            payload["cache_prompt"] = True
        what = "POST /v1/chat/completions"
        data = self._request("POST", "/v1/chat/completions", body=payload, context="chat")
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise self._malformed(what, "no choices[0].message.content") from None
        if not isinstance(content, str):
            raise self._malformed(what, "choices[0].message.content is not text")
        return content

    def embed(self, texts: list[str]) -> EmbeddingBatch:
        """``POST /v1/embeddings`` in batches; vectors come back in the order of ``texts``."""
        base = self._emb_base
        if base is None:
            raise ConfigError("no embeddings server URL configured")
        model = self.settings.embedding_model or self.settings.model
        vectors: list[list[float]] = []
        answered_model: str | None = None
        dim = 0
        what = "POST /v1/embeddings"
        size = self.settings.embedding_batch_size
        for start in range(0, len(texts), size):
            batch = list(texts[start : start + size])
            payload = {"input": batch, "model": model, "encoding_format": "float"}
            data = self._request("POST", "/v1/embeddings", body=payload, base=base, context="embeddings")
            got = self._parse_embeddings(data, len(batch), what, base)
            for vec in got:
                if dim == 0:
                    dim = len(vec)
                if len(vec) != dim or dim == 0:
                    raise self._malformed(
                        what,
                        f"embedding dimensions differ ({dim} and {len(vec)})",
                        base,
                    )
            vectors.extend(got)
            if isinstance(data.get("model"), str) and data["model"]:
                answered_model = answered_model or data["model"]
        return EmbeddingBatch(vectors=vectors, model=answered_model or model, dim=dim)

    def _parse_embeddings(self, data: Any, expected: int, what: str, base: str) -> list[list[float]]:
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise self._malformed(what, "no 'data' list", base)
        items: list[tuple[int, list[float]]] = []
        for item in data["data"]:
            if not isinstance(item, dict) or not isinstance(item.get("index"), int):
                raise self._malformed(what, "an item without an index", base)
            raw = item.get("embedding")
            vec: list[float]
            if isinstance(raw, str):
                try:
                    blob = base64.b64decode(raw, validate=True)
                except ValueError:
                    raise self._malformed(what, "bad base64 embedding", base) from None
                if len(blob) % 4:
                    raise self._malformed(what, "bad base64 embedding length", base)
                vec = list(struct.unpack(f"<{len(blob) // 4}f", blob))
            elif isinstance(raw, list) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw
            ):
                vec = [float(x) for x in raw]
            else:
                raise self._malformed(what, "an embedding that is not a list of numbers", base)
            items.append((item["index"], vec))
        items.sort(key=lambda pair: pair[0])
        if [i for i, _ in items] != list(range(expected)):
            raise self._malformed(what, f"expected {expected} embeddings indexed 0..{expected - 1}", base)
        return [vec for _, vec in items]

    def tokenize(self, texts: list[str]) -> list[int]:
        """Token counts per text via ``POST /tokenize``, one request per distinct text.

        Counts are kept in an LRU cache keyed by the text, so a repeated text costs no
        request.
        """
        counts: list[int] = []
        for text in texts:
            with self._lock:
                cached = self._token_cache.get(text)
                if cached is not None:
                    self._token_cache.move_to_end(text)
            if cached is None:
                data = self._request("POST", "/tokenize", body={"content": text}, context="tokenize")
                tokens = data.get("tokens") if isinstance(data, dict) else None
                if not isinstance(tokens, list):
                    raise self._malformed("POST /tokenize", "no 'tokens' list")
                cached = len(tokens)
                with self._lock:
                    self._token_cache[text] = cached
                    while len(self._token_cache) > _TOKENIZE_CACHE_SIZE:
                        self._token_cache.popitem(last=False)
            counts.append(cached)
        return counts

    def slots(self) -> list[SlotInfo]:
        """``GET /slots``: the server's slots with their context size and cached tokens."""
        data = self._request("GET", "/slots", context="slots")
        if not isinstance(data, list):
            raise self._malformed("GET /slots", "expected a JSON list")
        out: list[SlotInfo] = []
        for item in data:
            if not isinstance(item, dict):
                raise self._malformed("GET /slots", "a slot that is not an object")
            sid, n_ctx = item.get("id"), item.get("n_ctx")
            n_prompt = item.get("n_prompt_tokens")
            if not _is_int(sid) or not _is_int(n_ctx):
                raise self._malformed("GET /slots", "a slot without integer id/n_ctx")
            if n_prompt is not None and not _is_int(n_prompt):
                raise self._malformed("GET /slots", "n_prompt_tokens is not an integer")
            out.append(
                SlotInfo(
                    id=sid,
                    n_ctx=n_ctx,
                    n_prompt_tokens=n_prompt,
                    is_processing=bool(item.get("is_processing", False)),
                )
            )
        out.sort(key=lambda s: s.id)
        return out

    def check_slot(self, slot_id: int) -> SlotInfo:
        """Return the slot ``slot_id`` or raise BadInputError when the server has no such slot."""
        label = self._server_label(self._require_base())
        if not _is_int(slot_id):
            raise BadInputError(f"slot id must be an integer, not {slot_id!r}")
        slots = self.slots()
        for slot in slots:
            if slot.id == slot_id:
                return slot
        have = f"slots 0..{len(slots) - 1}" if slots else "no slots"
        raise BadInputError(f"slot {slot_id} does not exist on {label} (it has {have})")

    def _slot_action(self, slot_id: int, action: str, filename: str | None) -> Any:
        if filename is not None:
            validate_slot_filename(filename)
        self.check_slot(slot_id)
        body = {"filename": filename} if filename is not None else None
        return self._request(
            "POST",
            f"/slots/{slot_id}?action={action}",
            body=body,
            context="slots-action",
        )

    def slot_save(self, slot_id: int, filename: str) -> SlotSaveResult:
        """Save slot ``slot_id``'s KV cache into ``filename`` under the server's save path."""
        data = self._slot_action(slot_id, "save", filename)
        what = f"POST /slots/{slot_id}?action=save"
        if not isinstance(data, dict):
            raise self._malformed(what, "expected a JSON object")
        n_saved, n_written = data.get("n_saved"), data.get("n_written")
        if not _is_int(n_saved) or not _is_int(n_written):
            raise self._malformed(what, "no integer n_saved/n_written")
        return SlotSaveResult(
            filename=str(data.get("filename", filename)),
            n_saved=n_saved,
            n_written=n_written,
        )

    def slot_restore(self, slot_id: int, filename: str) -> SlotRestoreResult:
        """Load ``filename`` from the server's save path into slot ``slot_id``."""
        data = self._slot_action(slot_id, "restore", filename)
        what = f"POST /slots/{slot_id}?action=restore"
        if not isinstance(data, dict):
            raise self._malformed(what, "expected a JSON object")
        n_restored, n_read = data.get("n_restored"), data.get("n_read")
        if not _is_int(n_restored) or not _is_int(n_read):
            raise self._malformed(what, "no integer n_restored/n_read")
        return SlotRestoreResult(
            filename=str(data.get("filename", filename)),
            n_restored=n_restored,
            n_read=n_read,
        )

    def slot_erase(self, slot_id: int) -> int:
        """Erase slot ``slot_id``'s KV cache; return the number of tokens erased."""
        data = self._slot_action(slot_id, "erase", None)
        n_erased = data.get("n_erased") if isinstance(data, dict) else None
        if not _is_int(n_erased):
            raise self._malformed(f"POST /slots/{slot_id}?action=erase", "no integer n_erased")
        return n_erased

    make_slot_filename = staticmethod(make_slot_filename)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _hint(status: int, context: str, message: str) -> str:
    """A fix for the known misconfigurations, from the answer's status and message."""
    low = message.lower()
    if status == 501 and context == "slots-action":
        return "start llama-server with --slot-save-path to enable slot save/restore"
    if status == 501 and context == "slots":
        return "start llama-server with --slots to enable the slots endpoint"
    if status == 501 and context == "embeddings":
        return "start llama-server with --embeddings to enable embeddings"
    if status == 400 and context == "embeddings" and "pooling" in low:
        return "start llama-server with --pooling mean (or cls/last)"
    if status >= 500 and context == "embeddings" and "too large" in low:
        return "a text is longer than the embedding model's context; shorten it"
    if status == 503 and "loading" in low:
        return "the server is still loading its model; try again shortly"
    if status in (401, 403):
        return "check the API key variable in the configuration"
    if status == 404 and context == "tokenize":
        return "this server has no /tokenize endpoint (llama-server has one)"
    if status == 404 and context in ("slots", "slots-action"):
        return "this server has no slot API; use llama.cpp's llama-server"
    if status == 400 and "exceed" in low and "context" in low:
        return "the prompt does not fit the slot's context; start the server with a larger -c"
    return ""
