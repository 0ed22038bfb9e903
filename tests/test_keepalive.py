"""The keep-alive HTTP connections kvcache talks to model servers over (``llm.keepalive``):
connections are reused, one the server closed while idle is replaced without an error,
a stream left half-read is never reused, failures carry their kind, and the
environment's proxy is used."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kvcache_cli.llm.keepalive import KeepAlivePool, TransportError


class _Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lines: list[str] = []  # request lines, in order
        self.peers: list[int] = []  # the client port of each request (one per connection)
        self.close_after = False  # answer, then close the connection (as an idle timeout would)
        self.drop_second = False  # a connection's second request: closed without an answer
        self.delay = 0.0

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: a client that timed out leaves the answer nowhere to go."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Recorder

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        served = getattr(self, "_served", 0)
        self._served = served + 1
        if self.server.drop_second and served == 1:
            self.close_connection = True  # read, then closed: the client sees no answer
            return
        self.server.lines.append(self.requestline)
        self.server.peers.append(self.client_address[1])
        time.sleep(self.server.delay)
        if self.path.endswith("/eof"):  # HTTP/1.0: no length, the body ends with the connection
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end")
            self.close_connection = True
            return
        if self.path.endswith("/badchunk"):  # a chunk size that is not hexadecimal
            self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n")
            return
        if self.path.endswith("/continue"):  # an interim answer first, and a repeated header
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.write(b"HTTP/1.1 201 Created\r\nX-Tag: a\r\nx-tag: b\r\nContent-Length: 2\r\n\r\nok")
            return
        if self.path.endswith("/stream"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for n in range(3):
                event = b"data: %d\n\n" % n
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.server.close_after:
            self.close_connection = True


@pytest.fixture
def server() -> Iterator[_Recorder]:
    srv = _Recorder()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_connections_are_kept_alive_and_reused(server: _Recorder) -> None:
    pool = KeepAlivePool(server.url + "/base", {"X-Key": "k"})
    for _ in range(3):
        reply = pool.request("GET", "/health")
        assert reply.status == 200 and reply.content == b'{"ok": true}'
    assert server.lines == ["GET /base/health HTTP/1.1"] * 3
    assert len(set(server.peers)) == 1  # one connection for the three
    pool.close()


def test_a_connection_the_server_closed_while_idle_is_replaced(server: _Recorder) -> None:
    server.close_after = True  # each connection serves one request, then closes
    pool = KeepAlivePool(server.url)
    for _ in range(3):
        time.sleep(0.05)  # the close reaches the idle connection
        assert pool.request("GET", "/health").status == 200
    assert len(set(server.peers)) == 3
    pool.close()


def test_a_request_a_reused_connection_loses_is_sent_again_on_a_new_one(server: _Recorder) -> None:
    """The server closes a kept-alive connection as the next request arrives (the race
    the idle check cannot see): the request goes again, once, on a new connection."""
    server.drop_second = True
    pool = KeepAlivePool(server.url)
    assert pool.request("GET", "/first").status == 200
    assert pool.request("GET", "/second").status == 200
    assert server.lines == ["GET /first HTTP/1.1", "GET /second HTTP/1.1"]
    assert len(set(server.peers)) == 2
    pool.close()


def test_a_stream_read_to_its_end_returns_its_connection_one_left_half_read_does_not(
    server: _Recorder,
) -> None:
    pool = KeepAlivePool(server.url)
    whole = pool.open("GET", "/stream")
    assert b"".join(whole) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert pool.request("GET", "/health").status == 200
    assert len(set(server.peers)) == 1  # the stream's connection was reused
    half = pool.open("GET", "/stream")
    next(iter(half))
    half.close()  # the client went away mid-stream
    assert pool.request("GET", "/health").status == 200
    assert len(set(server.peers)) == 2  # a new connection: the half-read one was closed
    pool.close()


def test_failures_carry_their_kind(server: _Recorder) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransportError) as refused:
        KeepAlivePool(f"http://127.0.0.1:{port}").request("GET", "/health")
    assert refused.value.kind == "refused" and not refused.value.timed_out
    server.delay = 1.0
    with pytest.raises(TransportError) as slow:
        KeepAlivePool(server.url, read_timeout=0.2).request("GET", "/health")
    assert slow.value.kind == "read_timeout" and slow.value.timed_out


def test_the_environments_proxy_is_asked_with_the_absolute_url(
    server: _Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", server.url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    pool = KeepAlivePool("http://model-server.example:8080/v")
    assert pool.request("GET", "/health").status == 200
    assert server.lines == ["GET http://model-server.example:8080/v/health HTTP/1.1"]
    monkeypatch.setenv("no_proxy", "model-server.example")
    assert KeepAlivePool("http://model-server.example:8080")._proxy is None


def test_a_whole_answer_chunked_or_ended_by_its_connection_is_read_whole(server: _Recorder) -> None:
    pool = KeepAlivePool(server.url)
    chunked = pool.request("GET", "/stream")
    assert chunked.status == 200 and chunked.content == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert pool.request("GET", "/health").content == b'{"ok": true}'
    assert len(set(server.peers)) == 1  # the chunked answer's connection was reused
    ended = pool.request("GET", "/eof")
    assert ended.content == b"to the end" and ended.header("content-type") == "text/plain"
    interim = pool.request("GET", "/continue")
    assert (interim.status, interim.content, interim.header("X-Tag")) == (201, b"ok", "a, b")
    assert pool.request("GET", "/health").status == 200
    assert len(set(server.peers)) == 2  # a new connection after the one the server ended
    pool.close()


def test_a_malformed_answer_is_a_transport_failure(server: _Recorder) -> None:
    with pytest.raises(TransportError) as bad:
        KeepAlivePool(server.url).request("GET", "/badchunk")
    assert bad.value.kind == "failed" and "chunk size" in str(bad.value)


def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(server: _Recorder) -> None:
    pool = KeepAlivePool(server.url, {"Authorization": "Bearer k\r\nX-Injected: 1"})
    with pytest.raises(TransportError) as refused:
        pool.request("GET", "/health")
    assert refused.value.kind == "failed" and "line break" in str(refused.value)
    assert server.lines == []
