"""``kvcache serve``: the official openai client against the real server process,
in front of the fake llama-server."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from tests.fake_llama_server import FakeLlamaServer  # noqa: E402
from tests.helpers import cli_env, dump_db, run_kvcache, table_rows  # noqa: E402
from tests.pg import pg_url  # noqa: E402,F401  (fixture)
from tests.serve_util import ServeProcess  # noqa: E402


def stored(db: Path | str, session: str) -> list[tuple[str, str]]:
    """The session's stored (role, content) in order (a SQLite file or a PostgreSQL URL)."""
    rows = table_rows(
        db,
        "SELECT m.role, m.content FROM messages m JOIN sessions s ON s.id = m.session_id "
        "WHERE s.key = ? ORDER BY m.message_index",
        (session,),
    )
    return [(str(r), str(c)) for r, c in rows]


def session_keys(db: Path) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [str(r[0]) for r in con.execute("SELECT key FROM sessions ORDER BY key")]
    finally:
        con.close()


def write_config(home: Path, text: str = "") -> Path:
    path = home / "kvcache.toml"
    path.write_text("[cache]\ngenerate_cache_embeddings = false\n" + text)
    return path


def client(serve: ServeProcess, **kwargs: Any) -> Any:
    return serve.openai(**kwargs)


SHARED_CONFIG = """
[llm]
read_timeout = 2.0
retries = 0

[serve]
max_body_bytes = 65536
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLlamaServer]:
    with FakeLlamaServer(n_slots=2, n_ctx=2048) as srv:
        yield srv


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, fake: FakeLlamaServer) -> Iterator[ServeProcess]:
    """One server for the tests that need nothing special (each uses its own sessions)."""
    home = tmp_path_factory.mktemp("serve")
    with ServeProcess(home, home / "kv.db", fake.url, config=write_config(home, SHARED_CONFIG)) as proc:
        yield proc


@pytest.fixture
def upstream(fake: FakeLlamaServer) -> Iterator[FakeLlamaServer]:
    """The shared fake, back to normal after the test."""
    yield fake
    fake.set_mode("normal")
    fake.chat_reply = None
    fake.chat_delay = 0.0
    fake.stream_delay = 0.0
    fake.chat_tool_calls = None
    with fake._lock:
        fake._failures.clear()


def test_replies_arrive_intact_and_are_stored(serve: ServeProcess, upstream: FakeLlamaServer) -> None:
    fake = upstream
    api = client(serve)
    history = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a red fruit."},
    ]
    raw = api.chat.completions.with_raw_response.create(
        model="m", messages=history, extra_headers={"X-Session-Id": "fruit-1"}
    )
    reply = raw.parse()
    assert raw.headers["x-kvcache-session"] == "fruit-1"
    direct = fake._reply_text(history)
    assert reply.choices[0].message.content == direct
    # the same history through the fake alone gives the same text: nothing was altered
    history.append({"role": "assistant", "content": reply.choices[0].message.content})
    history.append({"role": "user", "content": "And a yellow one, streamed?"})
    stream = api.chat.completions.create(
        model="m", messages=history, stream=True, extra_headers={"X-Session-Id": "fruit-1"}
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    text = "".join(pieces)
    assert len([p for p in pieces if p]) > 3  # arrived as many chunks, not one
    assert text == fake._reply_text(history)
    history.append({"role": "assistant", "content": text})
    assert stored(serve.db, "fruit-1") == [(m["role"], m["content"]) for m in history]
    # the upstream saw the messages unchanged (the history fits)
    sent = [r.body for r in fake.requests if r.path == "/v1/chat/completions"]
    assert sent[-1]["messages"] == history[:-1]
    assert "X-Session-Id" not in json.dumps(sent[-1])
    deadline = time.monotonic() + 10  # a stream's line is written once it has ended
    while len(lines := [ln for ln in serve.stderr.splitlines() if "session=fruit-1" in ln]) < 2:
        assert time.monotonic() < deadline, serve.stderr
        time.sleep(0.05)
    assert len(lines) == 2 and all(ln.startswith("POST /v1/chat/completions 200") for ln in lines)


def test_session_found_by_prefix_and_by_user_field(serve: ServeProcess) -> None:
    api = client(serve)
    first = [{"role": "user", "content": "Plan a trip to Lisbon."}]
    raw = api.chat.completions.with_raw_response.create(model="m", messages=first)
    key = raw.headers["x-kvcache-session"]
    reply = raw.parse().choices[0].message.content
    again = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "In May?"}]
    raw2 = api.chat.completions.with_raw_response.create(model="m", messages=again)
    assert raw2.headers["x-kvcache-session"] == key  # no id: the stored history it extends
    raw3 = api.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], user="alice"
    )
    assert raw3.headers["x-kvcache-session"] == "alice"
    assert raw3.parse().model_extra["kvcache"]["session_id"] == "alice"
    assert len(stored(serve.db, key)) == 4


# under 100 characters and no question mark: the engine's retrieval trigger stays off
FILLER = "Tell me about {topic}, part {n}: its history, its people, its small details."
TOPICS = ["gardening", "sailing", "chess", "baking", "astronomy", "cycling", "pottery", "jazz", "geology"]
FACT = "For the record, my locker combination is 73519 and the locker is in the Quokka building."


@pytest.mark.slow
def test_long_conversation_stays_in_context_and_recalls_an_early_fact(tmp_path: Path) -> None:
    """300 turns against a 2,048-token upstream: every prompt kvcache sends fits (the
    fake refuses any that does not), while the same history sent directly is refused;
    the fact of turn 5 is in what the model sees when asked at turn 250."""
    with FakeLlamaServer(n_slots=1, n_ctx=2048) as fake:
        fake.chat_reply = "Noted, tell me more."
        with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, config=write_config(tmp_path)) as serve:
            api = client(serve)
            history: list[dict[str, str]] = [{"role": "system", "content": "You are a patient listener."}]
            asked_at = 250
            for turn in range(1, 301):
                if turn == 5:
                    text = FACT
                elif turn == asked_at:
                    text = "What is my locker combination in the Quokka building?"
                else:
                    text = FILLER.format(topic=TOPICS[turn % len(TOPICS)], n=turn)
                history.append({"role": "user", "content": text})
                # the history goes as extra_body: the client's per-message type transform
                # costs about 1 ms per message per call, minutes over 300 growing turns
                reply = api.chat.completions.create(
                    model="m",
                    messages=[],
                    max_tokens=64,
                    extra_headers={"X-Session-Id": "long"},
                    extra_body={"messages": history},
                )
                history.append({"role": "assistant", "content": reply.choices[0].message.content})
            direct = openai.OpenAI(base_url=fake.url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.BadRequestError) as refused:
                direct.chat.completions.create(model="m", messages=history[:-1], max_tokens=64)
            assert "exceed" in str(refused.value)
            traces = serve.traces()
    assert len(traces) == 300 and all(t["status"] == 200 for t in traces)
    sent = [
        r.body for r in fake.requests if r.path == "/v1/chat/completions" and r.body.get("max_tokens") == 64
    ]
    assert len(sent) >= 300  # every turn answered by the upstream (the fake refuses a prompt > n_ctx)
    assert max(t["usage"]["prompt_tokens"] for t in traces) + 64 <= 2048
    assert any("cleared" in t["action"] for t in traces)
    asked = traces[asked_at - 1]
    assert asked["context_start"] > 20  # the fact's turn left the verbatim context long ago
    assert any("73519" in str(m["content"]) for m in asked["messages"])
    assert stored(tmp_path / "kv.db", "long") == [(m["role"], m["content"]) for m in history]


def ask(api: Any, history: list[dict[str, str]], session: str | None = None) -> tuple[str, str]:
    """One non-streamed turn; returns (reply text, the session kvcache used)."""
    headers = {"X-Session-Id": session} if session else {}
    raw = api.chat.completions.with_raw_response.create(model="m", messages=history, extra_headers=headers)
    return raw.parse().choices[0].message.content, raw.headers["x-kvcache-session"]


def test_regenerate_replaces_the_reply_and_an_edit_branches(
    serve: ServeProcess, upstream: FakeLlamaServer
) -> None:
    api = client(serve)
    history = [{"role": "user", "content": "Suggest a name for a cat."}]
    upstream.chat_reply = "Tom."
    first, key = ask(api, history, "regen-1")
    history += [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Another one for a dog?"},
    ]
    second, _ = ask(api, history, "regen-1")
    upstream.chat_reply = "Rex."
    raw = api.chat.completions.with_raw_response.create(
        model="m", messages=history, extra_headers={"X-Session-Id": "regen-1"}
    )  # the same history again: a regenerate
    assert raw.headers["x-kvcache-turn"] == "regenerate"
    assert stored(serve.db, "regen-1") == [
        ("user", "Suggest a name for a cat."),
        ("assistant", "Tom."),
        ("user", "Another one for a dog?"),
        ("assistant", "Rex."),
    ]
    # an edited first message: a new session branched from the common prefix (nothing)
    edited = [{"role": "user", "content": "Suggest a name for a parrot."}]
    upstream.chat_reply = "Polly."
    raw = api.chat.completions.with_raw_response.create(
        model="m", messages=edited, extra_headers={"X-Session-Id": "regen-1"}
    )
    branch = raw.headers["x-kvcache-session"]
    assert branch != "regen-1" and raw.headers["x-kvcache-branched-from"] == "regen-1"
    assert stored(serve.db, branch) == [("user", "Suggest a name for a parrot."), ("assistant", "Polly.")]
    assert len(stored(serve.db, "regen-1")) == 4  # the original is untouched
    # an edit of the second user message keeps the first exchange in the branch
    edited2 = [*history[:2], {"role": "user", "content": "Another one for a hamster?"}]
    raw = api.chat.completions.with_raw_response.create(
        model="m", messages=edited2, extra_headers={"X-Session-Id": "regen-1"}
    )
    branch2 = raw.headers["x-kvcache-session"]
    assert stored(serve.db, branch2) == [
        ("user", "Suggest a name for a cat."),
        ("assistant", "Tom."),
        ("user", "Another one for a hamster?"),
        ("assistant", "Polly."),
    ]


def test_a_session_another_server_rewrote_is_compared_with_the_store(
    serve: ServeProcess, upstream: FakeLlamaServer, tmp_path: Path
) -> None:
    """serve remembers what it stored last (so a turn need not read the whole history);
    a second server regenerating the reply behind its back (same message count) must
    still make the first one see the client's history as diverging: an edit, a branch."""
    api = client(serve)
    history = [{"role": "user", "content": "Name a river."}]
    upstream.chat_reply = "Nile."
    ask(api, history, "behind-1")
    history += [{"role": "assistant", "content": "Nile."}, {"role": "user", "content": "And a lake?"}]
    upstream.chat_reply = "Baikal."
    ask(api, history, "behind-1")  # remembered by the first server
    config = write_config(tmp_path, SHARED_CONFIG)
    with ServeProcess(tmp_path, serve.db, upstream.url, config=config) as other:
        upstream.chat_reply = "Victoria."
        raw = client(other).chat.completions.with_raw_response.create(
            model="m", messages=history, extra_headers={"X-Session-Id": "behind-1"}
        )
        assert raw.headers["x-kvcache-turn"] == "regenerate"
    rewritten = [
        ("user", "Name a river."),
        ("assistant", "Nile."),
        ("user", "And a lake?"),
        ("assistant", "Victoria."),
    ]
    assert stored(serve.db, "behind-1") == rewritten
    # the client of the first server still holds the old reply: its history now diverges
    history += [{"role": "assistant", "content": "Baikal."}, {"role": "user", "content": "And a sea?"}]
    upstream.chat_reply = "Caspian."
    raw = api.chat.completions.with_raw_response.create(
        model="m", messages=history, extra_headers={"X-Session-Id": "behind-1"}
    )
    assert raw.headers["x-kvcache-turn"] == "branch"
    assert raw.headers["x-kvcache-branched-from"] == "behind-1"
    assert stored(serve.db, "behind-1") == rewritten  # the original is untouched
    assert stored(serve.db, raw.headers["x-kvcache-session"]) == [
        *rewritten[:3],
        ("assistant", "Baikal."),
        ("user", "And a sea?"),
        ("assistant", "Caspian."),
    ]


def test_bad_requests_get_their_status_and_store_nothing(serve: ServeProcess) -> None:
    before = dump_db(serve.db)
    url = serve.url + "/v1/chat/completions"
    cases = [
        (b"{not json", 400, "invalid_json"),
        (json.dumps({"model": "m"}).encode(), 400, "invalid_request"),
        (json.dumps({"messages": []}).encode(), 400, "invalid_request"),
        (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400, "invalid_request"),
        (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(), 400, "no_user_message"),
        (
            json.dumps({"messages": [{"role": "user", "content": "x" * 70000}]}).encode(),
            413,
            "request_too_large",
        ),
        (json.dumps({"messages": [{"role": "user", "content": "word " * 5000}]}).encode(), 400, None),
    ]
    for body, status, code in cases:
        resp = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert resp.status_code == status, (body[:60], resp.text)
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "code"} and error["message"]
        if code is not None:
            assert error["code"] == code
    bad_id = requests.post(
        url,
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Session-Id": "../etc"},
        timeout=30,
    )
    assert bad_id.status_code == 400 and "session id" in bad_id.json()["error"]["message"]
    assert dump_db(serve.db) == before


def test_upstream_failures_map_to_5xx_and_a_retry_continues(
    serve: ServeProcess, upstream: FakeLlamaServer
) -> None:
    api = client(serve)
    history = [{"role": "user", "content": "First question of the failure test."}]
    upstream.fail_next(500, path="/v1/chat/completions")
    with pytest.raises(openai.APIStatusError) as failed:
        ask(api, history, "fail-1")
    assert failed.value.status_code == 502
    assert stored(serve.db, "fail-1") == [("user", "First question of the failure test.")]  # stored once
    reply, _ = ask(api, history, "fail-1")  # the client's retry continues the same turn
    assert stored(serve.db, "fail-1") == [
        ("user", "First question of the failure test."),
        ("assistant", reply),
    ]
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Second question."}]
    upstream.set_mode("loading")
    with pytest.raises(openai.APIStatusError) as loading:
        ask(api, history, "fail-1")
    assert loading.value.status_code == 503
    upstream.set_mode("normal")
    upstream.chat_delay = 3.0  # beyond [llm] read_timeout = 2
    with pytest.raises(openai.APIStatusError) as slow:
        ask(api, history, "fail-1")
    assert slow.value.status_code == 504
    upstream.chat_delay = 0.0
    upstream.fail_next(
        400,
        {"error": {"code": 400, "message": "bad grammar", "type": "invalid_request_error"}},
        path="/v1/chat",
    )
    with pytest.raises(openai.BadRequestError) as passed:
        ask(api, history, "fail-1")
    assert "bad grammar" in str(passed.value)  # an upstream 4xx is passed through
    reply2, _ = ask(api, history, "fail-1")
    history.append({"role": "assistant", "content": reply2})
    assert stored(serve.db, "fail-1") == [(m["role"], m["content"]) for m in history]
    metrics = requests.get(serve.url + "/metrics", timeout=10).text
    assert 'kvcache_upstream_errors_total{reason="http_500"} 1.0' in metrics
    assert 'kvcache_upstream_errors_total{reason="timeout"} 1.0' in metrics


def test_an_unreachable_upstream_is_502_and_health_says_so(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = write_config(tmp_path, SHARED_CONFIG)
    with ServeProcess(tmp_path, tmp_path / "kv.db", dead, "-q", config=config) as serve:
        assert "the upstream was unreachable at start" in serve.stderr
        with pytest.raises(openai.APIStatusError) as failed:
            ask(client(serve), [{"role": "user", "content": "anyone there"}], "dead-1")
        assert failed.value.status_code == 502
        assert failed.value.body["type"] == "upstream_error"
        health = requests.get(serve.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["upstream"]["status"] == "unavailable"
        assert stored(serve.db, "dead-1") == [("user", "anyone there")]
    assert "POST " not in serve.stderr  # -q: no request lines


def test_pass_through_endpoints_health_and_metrics(serve: ServeProcess, upstream: FakeLlamaServer) -> None:
    api = client(serve)
    assert [m.id for m in api.models.list()] == [upstream.model]
    vectors = api.embeddings.create(model="m", input=["red apple", "green pear"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == upstream.embedding_dim
    tokens = serve.post("/tokenize", {"content": "hello world"}).json()["tokens"]
    assert serve.post("/detokenize", {"tokens": tokens}).json()["content"].strip() == "hello world"
    health = requests.get(serve.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["kvcache"]["n_ctx"] == 2048
    assert serve.stderr.count("slot swapping is off: the upstream has no --slot-save-path") == 1
    metrics = requests.get(serve.url + "/metrics", timeout=10).text
    assert 'kvcache_requests_total{route="/v1/models",status="200"}' in metrics
    assert "kvcache_request_seconds_bucket" in metrics
    missing = requests.get(serve.url + "/v1/nothing", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def test_concurrent_clients_lose_nothing(serve: ServeProcess, upstream: FakeLlamaServer) -> None:
    """16 clients on 8 session ids at once: two clients share each id with different
    conversations, so one of each pair branches; every client's history is stored
    exactly under the session kvcache told it."""
    api = client(serve, settle=False)  # each answer at once: the clients do not wait for each other
    results: dict[int, tuple[str, list[dict[str, str]]]] = {}
    errors: list[BaseException] = []

    def converse(n: int) -> None:
        try:
            key = f"pair-{n // 2}"
            history: list[dict[str, str]] = []
            for turn in range(4):
                history.append(
                    {"role": "user", "content": f"client {n} turn {turn}: tell me about {TOPICS[n % 9]}"}
                )
                reply, key = ask(api, history, key)
                history.append({"role": "assistant", "content": reply})
            results[n] = (key, history)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=converse, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 16
    keys = {key for key, _ in results.values()}
    assert len(keys) == 16  # each pair: the id's session and one branch
    serve.settle()  # the last replies are stored just after their answers
    for key, history in results.values():
        assert stored(serve.db, key) == [(m["role"], m["content"]) for m in history]


def test_a_client_that_goes_away_mid_stream_stores_no_reply(
    serve: ServeProcess, upstream: FakeLlamaServer
) -> None:
    upstream.stream_delay = 0.05
    messages = [{"role": "user", "content": "Stream a long answer please"}]
    with serve.stream("gone-1", messages[0]["content"], timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        next(lines)
    # the connection is closed after the first event
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "gone-1" not in "".join(
        t["session"] for t in serve.traces() if t.get("status") == 499
    ):
        time.sleep(0.1)
    assert stored(serve.db, "gone-1") == [("user", "Stream a long answer please")]
    upstream.stream_delay = 0.0
    reply, _ = ask(client(serve), messages, "gone-1")  # the retry completes the turn
    assert stored(serve.db, "gone-1")[-1] == ("assistant", reply)


@pytest.mark.slow
def test_sigterm_mid_stream_finishes_it_and_stops_cleanly(tmp_path: Path) -> None:
    with FakeLlamaServer(n_slots=1, n_ctx=2048) as fake:
        fake.stream_delay = 0.1
        serve = ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, "-v", config=write_config(tmp_path))
        try:
            events: list[bytes] = []
            with serve.stream("term-1", "Tell me a long story about a lighthouse") as resp:
                lines = resp.iter_lines()
                events.append(next(lines))
                serve.proc.send_signal(signal.SIGTERM)
                events += [ln for ln in lines if ln]
            code = serve.proc.wait(timeout=60)
        finally:
            serve.stop()
    assert code == 0
    assert events[-1] == b"data: [DONE]"  # the stream in flight finished
    text = "".join(
        json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events if e != b"data: [DONE]"
    )
    assert stored(tmp_path / "kv.db", "term-1") == [
        ("user", "Tell me a long story about a lighthouse"),
        ("assistant", text),
    ]
    assert "kvcache serve: stopped" in serve.stderr
    line = next(ln for ln in serve.stderr.splitlines() if ln.startswith("POST /v1/chat/completions"))
    assert "session=term-1" in line and "cached=" in line and "stored=True" in line  # -v: the detail


def test_the_log_line_shows_the_upstreams_prompt_count(tmp_path: Path) -> None:
    """``tokens=`` is the upstream's own ``usage.prompt_tokens`` once the answer is in
    (not the byte bound that spared the ``/tokenize`` call), streamed or not."""
    with FakeLlamaServer(n_slots=1, n_ctx=2048) as fake:
        serve = ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, config=write_config(tmp_path))
        try:
            history = [{"role": "user", "content": "How tall is the lighthouse on the north cape?"}]
            raw = client(serve).chat.completions.with_raw_response.create(
                model="m", messages=history, extra_headers={"X-Session-Id": "log-1"}
            )
            counted = raw.parse().usage.prompt_tokens
            history += [{"role": "assistant", "content": raw.parse().choices[0].message.content}]
            history += [{"role": "user", "content": "And who keeps it?"}]
            streamed = requests.post(
                serve.url + "/v1/chat/completions",
                json={"messages": history, "stream": True},
                headers={"X-Session-Id": "log-1"},
                timeout=60,
            ).text
            last = [json.loads(ln[6:]) for ln in streamed.splitlines() if ln.startswith("data: {")][-1]
            timings = last["timings"]  # llama-server's stream ends with timings, not usage
        finally:
            serve.stop()
    lines = [ln for ln in serve.stderr.splitlines() if ln.startswith("POST /v1/chat/completions 200")]
    assert len(lines) == 2
    assert f"tokens={counted}/" in lines[0], lines[0]
    assert f"tokens={timings['prompt_n'] + timings['cache_n']}/" in lines[1], lines[1]


def test_security_defaults(tmp_path: Path, fake: FakeLlamaServer) -> None:
    rc = run_kvcache(
        "serve", "--upstream", fake.url, "--host", "0.0.0.0", home=tmp_path, db=tmp_path / "kv.db", timeout=60
    )
    assert rc.returncode == 2 and "--api-key-env" in rc.stderr and "Traceback" not in rc.stderr
    env = {"SERVE_KEY": "s3cret-key"}
    with ServeProcess(
        tmp_path,
        tmp_path / "kv.db",
        fake.url,
        "--api-key-env",
        "SERVE_KEY",
        config=write_config(tmp_path),
        env=env,
    ) as serve:
        message = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.AuthenticationError):
            ask(client(serve, api_key="wrong"), message, "sec-1")
        assert requests.get(serve.url + "/health", timeout=10).status_code == 200  # public
        assert requests.get(serve.url + "/metrics", timeout=10).status_code == 401
        reply, _ = ask(client(serve, api_key="s3cret-key"), message, "sec-1")
        assert stored(serve.db, "sec-1") == [("user", "hi"), ("assistant", reply)]
    assert "s3cret-key" not in serve.stderr + serve.trace.read_text()


def test_serve_without_its_extra_prints_the_install_hint(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None; from kvcache_cli.cli.app import main; "
        "sys.argv = ['kvcache', 'serve', '--upstream', 'http://127.0.0.1:9']; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "kvcache: error: kvcache serve needs the serve extra: pip install 'kvcache-cli[serve]' "
        "(from a clone: pip install '.[serve]')"
    )


def test_other_commands_do_not_import_the_server_stack(tmp_path: Path) -> None:
    code = (
        "import sys; from kvcache_cli.cli.app import main; sys.argv = ['kvcache', 'stats', '--json']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', "
        "'prometheus_client') or m.startswith('kvcache_cli.server')), file=sys.stderr)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert proc.stderr.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_sessions_swap_through_slot_files(tmp_path: Path) -> None:
    """Three sessions over two slots: the least recently used one is saved to its file
    when a third moves in, and restored (and its reuse checked) when it returns; a
    restarted upstream's empty slot never overwrites a file."""
    files = tmp_path / "slots"
    files.mkdir()
    with FakeLlamaServer(n_slots=2, n_ctx=2048, slot_save_path=files) as fake:
        with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, config=write_config(tmp_path)) as serve:
            assert "slot swapping is on: 2 slot(s)" in serve.stderr
            api = client(serve)
            histories: dict[str, list[dict[str, str]]] = {k: [] for k in ("A", "B", "C")}

            def turn(key: str, text: str) -> None:
                histories[key].append({"role": "user", "content": text})
                reply, _ = ask(api, histories[key], f"slot-{key}")
                histories[key].append({"role": "assistant", "content": reply})

            for key in ("A", "B", "C"):  # C takes A's slot: A is saved
                turn(key, f"Session {key} opens with a long enough message about harbours and ships.")
            saved = {p.name for p in files.iterdir()}
            assert len(saved) == 1 and next(iter(saved)).endswith("-2048.bin")
            turn("A", "Back to A: what about lighthouses?")  # A returns to B's slot: B saved, A restored
            chats = [r for r in fake.requests if r.path == "/v1/chat/completions"]
            assert chats[-1].body["id_slot"] in (0, 1) and chats[-1].body["cache_prompt"] is True
            returning = serve.traces()[-1]
            assert returning["session"] == "slot-A" and returning["timings"]["cache_n"] > 20
            assert len(list(files.iterdir())) == 2
            metrics = requests.get(serve.url + "/metrics", timeout=10).text
            assert 'kvcache_slot_actions_total{action="restore",result="ok"} 1.0' in metrics
            assert 'kvcache_slot_actions_total{action="restore_check",result="reused"} 1.0' in metrics
            before = {p.name: p.read_bytes() for p in files.iterdir()}
            with fake._lock:  # the upstream restarted: its slots are empty
                for slot in fake._slots:
                    slot.tokens, slot.id_task = [], None
            turn("B", "B again after the restart.")
            assert {p.name: p.read_bytes() for p in files.iterdir()} == before  # no file overwritten
            metrics = requests.get(serve.url + "/metrics", timeout=10).text
            assert 'kvcache_slot_actions_total{action="save",result="skipped_empty"} 1.0' in metrics
    for key, history in histories.items():
        assert stored(tmp_path / "kv.db", f"slot-{key}") == [(m["role"], m["content"]) for m in history]
    # the operator's view: stats --json carries each live session's slot and prompt size
    rc, out, err = run_kvcache("stats", "slot-A", "--json", home=tmp_path, db=tmp_path / "kv.db")
    assert rc == 0, err
    live = json.loads(out)["sessions"][0]["metadata"]["serve"]
    assert live["n_ctx"] == 2048 and 0 < live["last_prompt_tokens"] <= live["capacity_tokens"]
    assert live["slot_restores"] == 1 and live["slot_saves"] == 1 and live["slot"] in (0, 1)
    rc, out, err = run_kvcache("stats", "slot-A", home=tmp_path, db=tmp_path / "kv.db")
    assert rc == 0 and "last prompt" in out and "1 saved, 1 restored" in out, out + err


@pytest.mark.slow
def test_two_servers_on_one_postgresql_store_never_interleave_a_session(
    tmp_path: Path,
    pg_url: str,  # noqa: F811  (the fixture)
    fake: FakeLlamaServer,
) -> None:
    """Two ``serve`` processes (two hosts) share one store; two clients send the same
    session's turns at the same time, one through each: the advisory lock serialises
    them, one of the two histories branches, both are stored exactly."""
    config = write_config(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        ServeProcess(tmp_path / "a", pg_url, fake.url, config=config) as first,
        ServeProcess(tmp_path / "b", pg_url, fake.url, config=config) as second,
    ):
        results: dict[int, tuple[str, list[dict[str, str]]]] = {}
        errors: list[BaseException] = []

        def converse(n: int, serve: ServeProcess) -> None:
            try:
                api, key, history = client(serve), "shared-1", []
                for turn in range(3):
                    history.append({"role": "user", "content": f"host {n} turn {turn}: about {TOPICS[n]}"})
                    reply, key = ask(api, history, key)
                    history.append({"role": "assistant", "content": reply})
                results[n] = (key, history)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=converse, args=(n, s)) for n, s in enumerate((first, second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors
    assert len({key for key, _ in results.values()}) == 2
    for key, history in results.values():
        assert stored(pg_url, key) == [(m["role"], m["content"]) for m in history]


@pytest.mark.slow
def test_a_prompt_the_engine_lets_grow_too_long_is_cleared_and_the_restart_remembers(tmp_path: Path) -> None:
    """With the engine's own clears out of reach, kvcache clears when the prompt would
    exceed the upstream's context (reason ContextLimit); where the context restarts is
    kept in the store, so a restarted serve sends the same short prompt."""
    config = write_config(tmp_path, "clear_after_conversations = 1000\nmemory_threshold_percent = 1.0\n")
    with FakeLlamaServer(n_slots=1, n_ctx=1024) as fake:
        fake.chat_reply = "Understood."
        history: list[dict[str, str]] = [{"role": "system", "content": "Be brief."}]
        with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, config=config) as serve:
            api = client(serve)
            for turn in range(40):
                history.append({"role": "user", "content": FILLER.format(topic=TOPICS[turn % 9], n=turn)})
                reply, _ = ask(api, history, "forced-1")
                history.append({"role": "assistant", "content": reply})
            traces = serve.traces()
        forced = [t for t in traces if t["clear_reason"] == "ContextLimit"]
        assert forced and all(t["status"] == 200 for t in traces)
        assert max(t["usage"]["prompt_tokens"] for t in traces) <= 1024 - 256  # the reply's reserve kept free
        last_start = traces[-1]["context_start"]
        assert last_start > 0
        with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, config=config) as again:
            history.append({"role": "user", "content": "One more thing about chess."})
            ask(client(again), history, "forced-1")
            after = again.traces()[-1]
    room = traces[-1]["capacity"] - traces[-1]["prompt_tokens_estimate"]
    if room > 60:  # one short turn fits: without the kept start, the restart would clear again
        assert after["context_start"] == last_start and after["action"] == "none"
    assert after["usage"]["prompt_tokens"] <= 1024 - 256
    assert stored(tmp_path / "kv.db", "forced-1")[: len(history) - 1] == [
        (m["role"], m["content"]) for m in history[:-1]
    ]


def test_tool_calls_and_tool_results_are_stored_the_same_whole_or_streamed(
    serve: ServeProcess, upstream: FakeLlamaServer
) -> None:
    """An assistant turn that is only tool calls is stored as their JSON (as ``process``
    stores such a message), whether it came whole or streamed in pieces; the tool's
    answer is stored with its text."""
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Lisbon"}'},
        }
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    api = client(serve)
    for session, stream in (("tools-whole", False), ("tools-stream", True)):
        upstream.chat_tool_calls = calls
        history: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Lisbon?"}]
        headers = {"X-Session-Id": session}
        if stream:
            chunks = list(
                api.chat.completions.create(
                    model="m", messages=history, tools=tools, stream=True, extra_headers=headers
                )
            )
            pieces = [
                c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls
            ]
            assert len(pieces) > 2  # the arguments came in pieces
        else:
            reply = api.chat.completions.create(
                model="m", messages=history, tools=tools, extra_headers=headers
            )
            assert reply.choices[0].message.tool_calls[0].function.arguments == '{"city": "Lisbon"}'
        upstream.chat_tool_calls = None
        # the whole reply goes back as the client library dumps it (its own key order and fields)
        sent_back = reply.choices[0].message.model_dump() if not stream else None
        history += [
            sent_back or {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"},
        ]
        answer, used = ask(api, history, session)
        assert used == session  # the tool turn continued the session (no branch)
        assert stored(serve.db, session) == [
            ("user", "Weather in Lisbon?"),
            ("assistant", json.dumps(calls, ensure_ascii=False)),
            ("tool", "Sunny, 24 C"),
            ("assistant", answer),
        ]
