"""``kvcache serve``'s edges an operator meets first: what ``-q`` leaves on stderr, the
stable ``code`` of every error body, ``/v1/embeddings`` sent to ``[llm] embeddings_url``."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("fastapi")

from kvcache_cli.cli.render import human_bytes  # noqa: E402
from tests.fake_llama_server import FakeLlamaServer  # noqa: E402
from tests.helpers import invoke, invoke_json, run_kvcache  # noqa: E402
from tests.serve_util import ServeProcess  # noqa: E402


def write_config(home: Path, text: str = "") -> Path:
    path = home / "kvcache.toml"
    path.write_text(
        "[cache]\ngenerate_cache_embeddings = false\n\n[llm]\nread_timeout = 2.0\nretries = 0\n" + text
    )
    return path


def chat(serve: ServeProcess, session: str, text: str, **extra: Any) -> requests.Response:
    body = {"messages": [{"role": "user", "content": text}], **extra}
    return serve.post("/v1/chat/completions", body, headers={"X-Session-Id": session})


def free_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLlamaServer]:
    """The chat upstream: like llama-server started without ``--embeddings`` (501)."""
    with FakeLlamaServer(n_slots=1, n_ctx=2048, embeddings=False) as srv:
        yield srv


# ----------------------------------------------------------------------------- -q
def test_quiet_keeps_only_the_listening_line(tmp_path: Path, fake: FakeLlamaServer) -> None:
    config = write_config(tmp_path)
    with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, "-q", config=config) as serve:
        assert chat(serve, "quiet-1", "Hello there").status_code == 200
        serve.terminate()
    lines = serve.stderr.splitlines()
    assert len(lines) == 1, lines  # no swapping line, no request line, no "stopped"
    assert lines[0].startswith(f"kvcache serve: listening on {serve.url}, managing {fake.url}")


def test_without_quiet_the_start_says_more_and_each_request_is_logged(
    tmp_path: Path, fake: FakeLlamaServer
) -> None:
    config = write_config(tmp_path)
    with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, config=config) as serve:
        assert chat(serve, "loud-1", "Hello there").status_code == 200
        serve.terminate()
    lines = serve.stderr.splitlines()
    assert lines[0].startswith("kvcache serve: listening on ")
    assert lines[1].startswith("kvcache serve: slot swapping is off")
    assert any(ln.startswith("POST /v1/chat/completions 200") for ln in lines)
    assert lines[-1] == "kvcache serve: stopped"


def test_serve_help_says_what_quiet_keeps(tmp_path: Path) -> None:
    shown = run_kvcache("serve", "--help", home=tmp_path, timeout=60)
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "With -q: only the listening line and errors." in text


# ----------------------------------------------------------------------------- error codes
def assert_error(answer: requests.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["message"]
    assert error["code"] == code, error


def test_every_upstream_failure_has_a_stable_code(tmp_path: Path, fake: FakeLlamaServer) -> None:
    config = write_config(tmp_path)
    with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, "-q", config=config) as serve:
        try:
            fake.fail_next(500, path="/v1/chat/completions")
            assert_error(chat(serve, "codes-1", "First"), 502, "upstream_error")
            fake.fail_next(500, path="/v1/chat/completions")
            assert_error(chat(serve, "codes-1", "First", stream=True), 502, "upstream_error")
            fake.fail_next(500, path="/tokenize")
            assert_error(serve.post("/tokenize", {"content": "x"}), 502, "upstream_error")
            fake.fail_next(502, "<html>bad gateway</html>", path="/v1/models")
            assert_error(requests.get(serve.url + "/v1/models", timeout=30), 502, "upstream_error")
            fake.set_mode("loading")
            assert_error(chat(serve, "codes-1", "First"), 503, "upstream_unavailable")
            fake.set_mode("normal")
            fake.chat_delay = 3.0  # beyond read_timeout = 2
            assert_error(chat(serve, "codes-1", "First"), 504, "upstream_timeout")
            fake.chat_delay = 0.0
            fake.fail_next(422, "cannot parse that", path="/v1/chat/completions")  # a 4xx, not JSON
            assert_error(chat(serve, "codes-1", "First"), 422, "upstream_rejected")
        finally:
            fake.set_mode("normal")
            fake.chat_delay = 0.0


def test_an_unreachable_upstream_has_its_code(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with ServeProcess(tmp_path, tmp_path / "kv.db", free_port_url(), "-q", config=config) as serve:
        assert_error(chat(serve, "gone-1", "Anyone there?"), 502, "upstream_unreachable")
        assert_error(requests.get(serve.url + "/v1/models", timeout=30), 502, "upstream_unreachable")


# ----------------------------------------------------------------------------- embeddings
def test_embeddings_go_to_the_configured_embeddings_server(tmp_path: Path, fake: FakeLlamaServer) -> None:
    with FakeLlamaServer(n_slots=1, n_ctx=512, embedding_dim=8) as embedder:
        config = write_config(tmp_path, f'embeddings_url = "{embedder.url}/v1"\n')
        with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, config=config) as serve:
            before = fake.count("POST", "/v1/embeddings")
            answer = serve.post("/v1/embeddings", {"input": ["red apple", "green pear"], "model": "m"})
            assert answer.status_code == 200, answer.text
            assert [len(d["embedding"]) for d in answer.json()["data"]] == [8, 8]
            assert embedder.count("POST", "/v1/embeddings") == 1
            assert fake.count("POST", "/v1/embeddings") == before  # the chat upstream was not asked
            assert f"embeddings to {embedder.url}" in serve.stderr.splitlines()[0]
            tokens = serve.post("/tokenize", {"content": "hello"})  # the rest still go upstream
            assert tokens.status_code == 200 and fake.count("POST", "/tokenize") >= 1


def test_without_an_embeddings_server_embeddings_go_upstream(tmp_path: Path, fake: FakeLlamaServer) -> None:
    config = write_config(tmp_path)
    with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, "-q", config=config) as serve:
        before = fake.count("POST", "/v1/embeddings")
        answer = serve.post("/v1/embeddings", {"input": ["red apple"], "model": "m"})
        assert_error(answer, 502, "upstream_error")  # the upstream's 501, as a 5xx is
        assert "HTTP 501" in answer.json()["error"]["message"]
        assert fake.count("POST", "/v1/embeddings") == before + 1


# ----------------------------------------------------------------------------- stats SESSION
def test_a_served_sessions_turn_log_is_process_s_and_the_chart_says_where_it_is_now(
    tmp_path: Path, fake: FakeLlamaServer
) -> None:
    """A turn's figure is the cache its question found, served or replayed alike (so the
    last reply is in no turn's figure); the chart's title also gives the cache now."""
    config = write_config(tmp_path)
    history: list[dict[str, str]] = []
    with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, "-q", config=config) as serve:
        for question in ("Hello!", "Tell me about the lighthouse on the north cape, please."):
            history.append({"role": "user", "content": question})
            answer = serve.post(
                "/v1/chat/completions", {"messages": history}, headers={"X-Session-Id": "chart"}
            )
            assert answer.status_code == 200, answer.text
            history.append(
                {"role": "assistant", "content": answer.json()["choices"][0]["message"]["content"]}
            )
    served = invoke_json("stats", "chart", home=tmp_path, db=tmp_path / "kv.db")
    exported = tmp_path / "chart.json"
    rc, _, err = invoke("export", "chart", "-o", exported, home=tmp_path, db=tmp_path / "kv.db")
    assert rc == 0, err
    replayed_db = tmp_path / "replayed.db"
    rc, _, err = invoke(
        "--config", config, "process", exported, "--server", fake.url, home=tmp_path, db=replayed_db
    )
    assert rc == 0, err
    replayed = invoke_json("stats", "chart", home=tmp_path, db=replayed_db)
    usage = served["session"]["usage"]
    assert [u["turn"] for u in usage] == [1, 2]
    assert usage == replayed["session"]["usage"]  # the same figures as process records
    now = served["sessions"][0]["cache_size_bytes"]
    assert now > max(u["cache_size_bytes"] for u in usage)  # the last reply came after
    rc, out, err = invoke("stats", "chart", home=tmp_path, db=tmp_path / "kv.db")
    assert rc == 0, err
    title = next(line for line in out.splitlines() if line.startswith("cache usage by turn:"))
    peak = human_bytes(max(u["cache_size_bytes"] for u in usage))
    assert title.startswith(f"cache usage by turn: peak {peak}, now {human_bytes(now)} of "), title


class _BrokenChat:
    """A chat service with a bug: every turn raises what no route expects."""

    n_ctx = 2048

    def handle(self, *_args: Any) -> Any:
        raise RuntimeError("a bug in the turn")


def test_a_bug_in_a_turn_is_a_500_with_the_error_shape_and_the_server_keeps_answering() -> None:
    import threading

    import uvicorn

    from kvcache_cli.server.api_server import AppSettings, create_app
    from kvcache_cli.server.metrics import Metrics
    from kvcache_cli.server.upstream import Upstream

    with FakeLlamaServer() as fake:
        upstream = Upstream(fake.url)
        app = create_app(_BrokenChat(), upstream, Metrics(), AppSettings(quiet=True))  # type: ignore[arg-type]
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(200):
                if server.started:
                    break
                threading.Event().wait(0.02)
            body = {"messages": [{"role": "user", "content": "hi"}]}
            resp = requests.post(f"{url}/v1/chat/completions", json=body, timeout=10)
            assert resp.status_code == 500
            assert resp.json() == {
                "error": {
                    "message": "kvcache: internal error (RuntimeError)",
                    "type": "server_error",
                    "code": "internal_error",
                }
            }
            assert requests.get(f"{url}/v1/models", timeout=10).status_code == 200
        finally:
            server.should_exit = True
            thread.join(10)
            upstream.close()
            sock.close()


def test_a_trace_file_that_cannot_be_written_is_one_clear_line(tmp_path: Path) -> None:
    run = invoke(
        "serve",
        "--upstream",
        "http://127.0.0.1:9",
        "--port",
        "0",
        "--trace",
        str(tmp_path / "no" / "t.jsonl"),
        home=tmp_path,
        db=tmp_path / "kv.db",
    )
    assert run.returncode == 2
    where = tmp_path / "no" / "t.jsonl"
    assert run.stderr.strip().splitlines() == [
        f"kvcache: error: --trace {where}: cannot write there (No such file or directory)"
    ]
