"""Keep-alive HTTP/1.1 connections to one server on the standard library's ``http.client``.

``kvcache serve`` makes two or three calls to its upstream on every chat turn; through
``requests`` each costs about 1.8 ms of CPU (preparing the request, its adapters and
``urllib3``), through ``http.client`` about 0.4 ms. :class:`KeepAlivePool` keeps idle
connections for reuse (one per concurrent request at most), sends each request whole
and reads the answer whole (:meth:`KeepAlivePool.request`) or piece by piece as it
arrives (:meth:`KeepAlivePool.open`). ``http.client`` connects (TLS, proxy tunnels)
and reads streams; a whole answer is written in one piece and read by
:func:`_read_answer`, which splits the header lines itself: ``http.client`` parses
them with the ``email`` package, 40% of the CPU time of a ``/tokenize`` call, and
``serve`` makes two such calls while a client waits. A connection the server closed
while it sat idle is noticed before reuse, and a request that fails on a reused connection before any
answer is sent again once on a new one. Failures are :class:`TransportError` with a
``kind``: ``connect_timeout``, ``read_timeout``, ``refused``, ``dns``, ``reset``,
``closed`` or ``failed``.

The environment's proxy variables (``http_proxy``, ``https_proxy``, ``no_proxy``) are
read once: a proxied ``http`` URL is asked through the proxy, an ``https`` one through a
``CONNECT`` tunnel. ``https`` checks certificates against the system's store, or the
bundle ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` names.
"""

from __future__ import annotations

import base64
import http.client
import os
import select
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import unquote, urlsplit

_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class TransportError(Exception):
    """A request that got no HTTP answer: ``kind`` says why (see the module's text)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind

    @property
    def timed_out(self) -> bool:
        return self.kind in ("connect_timeout", "read_timeout")


@dataclass
class Reply:
    """A whole answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)


MAX_HEADER_BYTES = 65536


class _Answer:
    """Reads one HTTP/1.x answer from a socket (``received``: bytes read so far, so a
    failure can tell "no answer at all" from "an answer cut short")."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.received = 0

    def _more(self) -> None:
        piece = self.sock.recv(65536)
        if not piece:
            if not self.received:
                raise http.client.RemoteDisconnected("the server closed the connection without an answer")
            raise http.client.IncompleteRead(bytes(self.buf))
        self.received += len(piece)
        self.buf += piece

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > MAX_HEADER_BYTES:
                raise http.client.LineTooLong("header line")
            self._more()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def rest(self) -> bytes:
        """Everything until the server closes the connection."""
        while True:
            piece = self.sock.recv(65536)
            if not piece:
                data = bytes(self.buf)
                self.buf.clear()
                return data
            self.buf += piece

    def head(self) -> tuple[str, int, dict[str, str]]:
        """Version, status and headers (names lower-cased; repeated ones joined by ", ")."""
        while True:
            version, _, rest = self.line().decode("latin-1").partition(" ")
            if not version.startswith("HTTP/") or not rest[:3].isdigit():
                raise http.client.BadStatusLine(f"{version} {rest}".strip())
            status = int(rest[:3])
            headers: dict[str, str] = {}
            while line := self.line():
                if len(headers) > 100:
                    raise http.client.HTTPException("more than 100 headers")
                name, _, value = line.decode("latin-1").partition(":")
                key = name.strip().lower()
                headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
            if not 100 <= status < 200:  # an interim answer (100 Continue) is skipped
                return version, status, headers

    def _chunk_size(self) -> int:
        line = self.line().split(b";")[0].strip()
        try:
            return int(line, 16)
        except ValueError:
            raise http.client.HTTPException(f"bad chunk size {line[:40]!r}") from None

    def body(self, method: str, status: int, headers: dict[str, str]) -> tuple[bytes, bool]:
        """The body, and whether the connection ended with it (read to its close)."""
        if method == "HEAD" or status in (204, 304):
            return b"", False
        if "chunked" in headers.get("transfer-encoding", "").lower():
            pieces = []
            while size := self._chunk_size():
                pieces.append(self.exactly(size + 2)[:-2])
            while self.line():  # trailers, up to the empty line
                pass
            return b"".join(pieces), False
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise http.client.HTTPException(f"bad Content-Length {length!r}")
            return self.exactly(int(length)), False
        return self.rest(), True


def _read_answer(method: str, answer: _Answer) -> tuple[int, dict[str, str], bytes, bool]:
    """One answer: status, headers, body, and whether its connection may be used again
    (HTTP/1.1, no ``Connection: close``, nothing unread)."""
    version, status, headers = answer.head()
    content, closed = answer.body(method, status, headers)
    reusable = (
        version == "HTTP/1.1"
        and not closed
        and "close" not in headers.get("connection", "").lower()
        and not answer.buf
    )
    return status, headers, content, reusable


def _kind(exc: BaseException, connecting: bool) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "connect_timeout" if connecting else "read_timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(exc, (http.client.RemoteDisconnected, http.client.IncompleteRead)):
        return "closed"
    return "failed"


def _readable(sock: socket.socket) -> bool:
    """Whether an idle connection has something to read: the server closed it."""
    if hasattr(select, "poll"):  # no limit on descriptor numbers (select stops at 1024)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


class KeepAlivePool:
    """Keep-alive connections to the server at ``base_url`` (``scheme://host[:port][/path]``;
    request paths are appended to its path). ``headers`` go with every request."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str] | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 120.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = host if parts.port is None else f"{host}:{self.port}"
        self.headers = dict(headers or {})
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._proxy = self._proxy_for(parts.scheme, self.host)
        self._absolute = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}" if self._proxy else ""
        self._context: ssl.SSLContext | None = None
        if self.https:
            bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            self._context = ssl.create_default_context(cafile=bundle or None)

    @staticmethod
    def _proxy_for(scheme: str, host: str) -> tuple[str, int, dict[str, str]] | None:
        """(host, port, headers) of the environment's proxy for this server, or None."""
        if urllib.request.proxy_bypass(host):
            return None
        url = urllib.request.getproxies_environment().get(scheme)
        if not url:
            return None
        parts = urlsplit(url if "://" in url else "http://" + url)
        if not parts.hostname:
            return None
        headers: dict[str, str] = {}
        if parts.username is not None:
            user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
        return parts.hostname, parts.port or 8080, headers

    # ------------------------------------------------------------ connections
    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        host, port = (self._proxy[0], self._proxy[1]) if self._proxy else (self.host, self.port)
        if self.https:
            conn = http.client.HTTPSConnection(
                host, port, timeout=self.connect_timeout, context=self._context
            )
            if self._proxy:
                conn.set_tunnel(self.host, self.port, headers=self._proxy[2])
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise TransportError(_kind(exc, connecting=True), str(exc)) from None
        assert conn.sock is not None
        conn.sock.settimeout(self.read_timeout)
        return conn

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection the server has not closed (reused: True), else a new one."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if conn.sock is not None and not _readable(conn.sock):
                return conn, True
            conn.close()  # readable while idle: closed by the server (or junk): not reused

    def _give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _finished(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """An answer read to its end: its connection is reused unless the server ends it."""
        if resp.will_close:
            conn.close()
        else:
            self._give(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # ------------------------------------------------------------ requests
    def _send(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send and read the status line and headers; a reused connection that fails
        before any answer is replaced once."""
        target = self._absolute + self.prefix + path
        sent = self._headers_with(headers)
        for attempt in (0, 1):
            conn, reused = self._take()
            try:
                conn.request(method, target, body=body, headers=sent)
                return conn, conn.getresponse()
            except _STALE as exc:
                conn.close()
                if reused and attempt == 0:
                    continue
                raise TransportError(_kind(exc, connecting=False), str(exc)) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise TransportError(_kind(exc, connecting=False), str(exc)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _headers_with(self, headers: dict[str, str] | None) -> dict[str, str]:
        """The pool's headers, then the request's, then a plain-HTTP proxy's credentials."""
        sent = {**self.headers, **(headers or {})}
        if self._proxy and not self.https:
            sent.update(self._proxy[2])
        return sent

    def _message(self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None) -> bytes:
        """The request line, headers and body as one piece (what ``http.client`` sends,
        with the ``Host`` and ``Accept-Encoding`` it adds)."""
        sent = {"Host": self._host_header, "Accept-Encoding": "identity", **self._headers_with(headers)}
        if body is not None or method in ("POST", "PUT", "PATCH"):
            sent["Content-Length"] = str(len(body or b""))
        lines = [f"{method} {self._absolute}{self.prefix}{path} HTTP/1.1"]
        for name, value in sent.items():
            if any(c in name or c in value for c in "\r\n\0"):
                raise ValueError(f"header {name!r}: a line break or NUL in a header")
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Reply:
        """Send a request and read the whole answer. A reused connection that fails
        before any of the answer arrived is replaced once (the server closed it)."""
        try:
            message = self._message(method, path, body, headers)
        except (ValueError, UnicodeEncodeError) as exc:
            raise TransportError("failed", str(exc)) from None
        for attempt in (0, 1):
            conn, reused = self._take()
            assert conn.sock is not None
            answer = _Answer(conn.sock)
            try:
                conn.sock.sendall(message)
                status, heads, content, reusable = _read_answer(method, answer)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and attempt == 0 and not answer.received and isinstance(exc, _STALE):
                    continue
                raise TransportError(_kind(exc, connecting=False), str(exc)) from None
            if reusable:
                self._give(conn)
            else:
                conn.close()
            return Reply(status, heads, content)
        raise AssertionError("unreachable")  # pragma: no cover

    def open(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Streamed:
        """Send a request; the answer's body is read by iterating the result."""
        conn, resp = self._send(method, path, body, headers)
        return Streamed(self, conn, resp)


class Streamed:
    """An answer read as it arrives: ``status``, ``headers``, then its body in pieces.

    The connection goes back to the pool when the body was read to its end, and is
    closed when :meth:`close` comes first (a client that went away mid-stream)."""

    def __init__(self, pool: KeepAlivePool, conn: http.client.HTTPConnection, resp: Any) -> None:
        self._pool = pool
        self._conn: http.client.HTTPConnection | None = conn
        self._resp = resp
        self.status: int = resp.status
        self.headers: Message = resp.msg

    def read_all(self) -> bytes:
        """The rest of the body at once (an error answer), then the connection is done."""
        try:
            return b"".join(self)
        finally:
            self.close()

    def __iter__(self) -> Iterator[bytes]:
        try:
            while True:
                piece = self._resp.read1(65536)
                if not piece:
                    break
                yield piece
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TransportError(_kind(exc, connecting=False), str(exc)) from None
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._finished(conn, self._resp)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
