"""``kvcache serve`` as a new user walks it: an edited conversation that goes on under
its first id, an upstream that starts after kvcache, the core's notices on stderr, an
abandoned stream's log line, and the small things an OpenAI client meets first."""

from __future__ import annotations

import hashlib
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("openai")
pytest.importorskip("fastapi")

from kvcache_cli.server.upstream_context import RETRY_SECONDS  # noqa: E402
from tests.fake_llama_server import FakeLlamaServer  # noqa: E402
from tests.helpers import run_kvcache  # noqa: E402
from tests.serve_util import ServeProcess  # noqa: E402


def write_config(home: Path, cache: str = "") -> Path:
    """The tests' config; ``cache``: more lines for its ``[cache]`` table."""
    path = home / "kvcache.toml"
    path.write_text(
        f"[cache]\ngenerate_cache_embeddings = false\n{cache}\n[llm]\nread_timeout = 5.0\nretries = 0\n"
    )
    return path


def stored(db: Path | str, session: str) -> list[tuple[str, str]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT m.role, m.content FROM messages m JOIN sessions s ON s.id = m.session_id "
            "WHERE s.key = ? ORDER BY m.message_index",
            (session,),
        ).fetchall()
    finally:
        con.close()
    return [(str(r), str(c)) for r, c in rows]


def keys_like(db: Path | str, prefix: str) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT key FROM sessions WHERE key LIKE ? ORDER BY key", (prefix + "%",))
        return [str(r[0]) for r in rows]
    finally:
        con.close()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLlamaServer]:
    with FakeLlamaServer(n_slots=1, n_ctx=4096, embeddings=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, fake: FakeLlamaServer) -> Iterator[ServeProcess]:
    """One server for the tests that need nothing special (each uses its own sessions)."""
    home = tmp_path_factory.mktemp("walk")
    with ServeProcess(home, home / "kv.db", fake.url, config=write_config(home)) as proc:
        yield proc


class Chat:
    """An openai client that keeps sending one ``X-Session-Id``; each answer's headers."""

    def __init__(self, serve: ServeProcess, session: str) -> None:
        self.api = serve.openai()
        self.session = session

    def ask(self, history: list[dict[str, str]], **extra: Any) -> tuple[dict[str, str], str]:
        raw = self.api.chat.completions.with_raw_response.create(
            model="m", messages=history, extra_headers={"X-Session-Id": self.session}, **extra
        )
        return dict(raw.headers), raw.parse().choices[0].message.content


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def as_rows(history: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in history]


# ----------------------------------------------------------------------------- D1 edits
def test_an_edited_conversation_goes_on_in_one_branch_under_its_first_id(serve: ServeProcess) -> None:
    """The client edits its second question and goes on, still sending the first id:
    the edit makes one branch, and every later turn extends that same branch (not a
    new copy of the whole history per turn); a retry of the edit regenerates in it."""
    chat = Chat(serve, "walk-edit")
    history = [user("Name a bird.")]
    headers, reply = chat.ask(history)
    assert headers["x-kvcache-turn"] == "new"
    history += [assistant(reply), user("Name a fish.")]
    headers, reply = chat.ask(history)
    assert headers["x-kvcache-turn"] == "extend"
    original = as_rows([*history, assistant(reply)])

    history = [*history[:2], user("Name a tree.")]  # the edit
    headers, reply = chat.ask(history)
    branch = headers["x-kvcache-session"]
    assert headers["x-kvcache-turn"] == "branch" and branch.startswith("walk-edit.edit-")
    assert headers["x-kvcache-branched-from"] == "walk-edit"
    headers, reply = chat.ask(history)  # the same edit again: a regenerate in its branch
    assert (headers["x-kvcache-turn"], headers["x-kvcache-session"]) == ("regenerate", branch)
    history.append(assistant(reply))
    for question in ("Name a flower.", "Name a stone.", "Name a river."):
        history.append(user(question))
        headers, reply = chat.ask(history)
        assert (headers["x-kvcache-turn"], headers["x-kvcache-session"]) == ("extend", branch)
        assert headers["x-kvcache-branched-from"] == "walk-edit"
        history.append(assistant(reply))
    assert keys_like(serve.db, "walk-edit") == sorted(["walk-edit", branch])
    assert stored(serve.db, branch) == as_rows(history)
    assert stored(serve.db, "walk-edit") == original  # the original is untouched


def test_an_edit_inside_a_branch_and_a_cut_history_each_go_on_in_one_branch(
    serve: ServeProcess, fake: FakeLlamaServer
) -> None:
    """An edit of the branch's own history goes on in a branch of the branch; a history
    cut before the stored one ends (the client regenerates an earlier reply) goes on in
    one branch too, though each later turn brings a reply there that differs again."""
    chat = Chat(serve, "walk-deep")
    history: list[dict[str, str]] = []
    for question in ("Name a colour.", "Name a metal."):
        history.append(user(question))
        history.append(assistant(chat.ask(history)[1]))
    history = [*history[:2], user("Name a gas.")]  # edit 1
    headers, reply = chat.ask(history)
    first = headers["x-kvcache-session"]
    history += [assistant(reply), user("Name a planet.")]
    history.append(assistant(chat.ask(history)[1]))

    history = [*history[:4], user("Name a moon.")]  # edit 2, inside the first branch
    headers, reply = chat.ask(history)
    second = headers["x-kvcache-session"]
    assert headers["x-kvcache-turn"] == "branch" and second.startswith(first + ".edit-")
    assert headers["x-kvcache-branched-from"] == first
    history += [assistant(reply), user("Name a comet.")]
    headers, reply = chat.ask(history)
    assert (headers["x-kvcache-turn"], headers["x-kvcache-session"]) == ("extend", second)
    history.append(assistant(reply))
    assert stored(serve.db, second) == as_rows(history)

    cut = history[:5]  # the second branch's history up to "Name a moon.", without what followed
    fake.chat_reply = "Europa."  # the regenerated reply differs from the stored one
    try:
        headers, reply = chat.ask(cut)
    finally:
        fake.chat_reply = None
    third = headers["x-kvcache-session"]
    assert headers["x-kvcache-turn"] == "branch" and third.startswith(second + ".edit-")
    cut += [assistant(reply), user("Name a star.")]
    headers, reply = chat.ask(cut)
    assert (headers["x-kvcache-turn"], headers["x-kvcache-session"]) == ("extend", third)
    cut.append(assistant(reply))
    assert stored(serve.db, third) == as_rows(cut)
    assert len(keys_like(serve.db, "walk-deep")) == 4


# ----------------------------------------------------------------------------- D5 late upstream
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_upstream_that_starts_after_kvcache_is_asked_for_its_context_size(tmp_path: Path) -> None:
    """Started while the upstream is down, serve says so and uses ``[model] n_ctx``; on
    chat turns it asks the upstream again (at most once every few seconds) and uses its
    ``n_ctx`` once known (the capacity, ``/health``)."""
    port = free_port()
    config = write_config(tmp_path)
    with ServeProcess(tmp_path, tmp_path / "kv.db", f"http://127.0.0.1:{port}", config=config) as serve:
        lines = serve.stderr.splitlines()
        assert "the upstream was unreachable at start: using [model] n_ctx 4096" in lines[0], lines
        assert "asked again on chat turns" in lines[0]
        assert lines[1] == (
            "kvcache serve: slot swapping is off until restart: the upstream was unreachable at start"
        )
        assert requests.get(serve.url + "/health", timeout=10).json()["kvcache"]["n_ctx"] is None
        with FakeLlamaServer(n_slots=1, n_ctx=1024, embeddings=False, port=port) as fake:
            fake.fail_next(503, path="/slots")  # still loading when the first turn asks
            fake.fail_next(503, path="/props")
            body = {"messages": [user("Hello?")], "max_tokens": 100}
            headers = {"X-Session-Id": "late-1"}
            assert serve.post("/v1/chat/completions", body, headers=headers).status_code == 200
            body["messages"] = [user("Hello again?")]
            headers["X-Session-Id"] = "late-2"
            assert serve.post("/v1/chat/completions", body, headers=headers).status_code == 200
            assert fake.count("GET", "/slots") == 1  # the second turn, right after, did not ask
            assert [t["capacity"] for t in serve.traces()] == [4096 - 100, 4096 - 100]
            time.sleep(RETRY_SECONDS + 0.5)
            headers["X-Session-Id"] = "late-3"
            assert serve.post("/v1/chat/completions", body, headers=headers).status_code == 200
            assert fake.count("GET", "/slots") == 2
            assert serve.traces()[-1]["capacity"] == 1024 - 100
            health = requests.get(serve.url + "/health", timeout=10).json()
            assert health["kvcache"]["n_ctx"] == 1024
            serve.terminate()  # its stderr is whole once it has stopped
    told = "kvcache serve: late-3: the upstream's n_ctx is 1024 (from /slots), used from now on"
    assert told in serve.stderr.splitlines()


# ----------------------------------------------------------------------------- D2 notices
def test_the_cores_notices_of_a_turn_go_to_stderr_and_the_trace(
    tmp_path: Path, fake: FakeLlamaServer
) -> None:
    """The summary of a clearing turn fails upstream: the engine falls back to its
    extractive summary and says so, as ``process`` would; serve tells it on stderr, one
    line naming the session before the request's line, and in the turn's trace record."""
    config = write_config(tmp_path, "clear_after_conversations = 2\n")
    history: list[dict[str, str]] = []
    with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, config=config) as serve:
        for n in range(4):
            if n == 3:  # the turn whose clear asks the upstream for a summary first
                fake.fail_next(500, path="/v1/chat/completions")
            history.append(user(f"Tell me about topic {n}."))
            answer = serve.post(
                "/v1/chat/completions", {"messages": history}, headers={"X-Session-Id": "sum-1"}
            )
            assert answer.status_code == 200, answer.text
            history.append(assistant(answer.json()["choices"][0]["message"]["content"]))
        serve.terminate()  # its stderr is whole once it has stopped
    lines = serve.stderr.splitlines()
    traces = serve.traces()
    told = [i for i, line in enumerate(lines) if line.startswith("kvcache serve: sum-1: summary: ")]
    assert len(told) == 1, lines
    assert lines[told[0]].endswith("; used the extractive summary instead")
    assert lines[told[0] + 1].startswith("POST /v1/chat/completions 200 ")
    assert "action=cleared" in lines[told[0] + 1]
    notices = [t["notices"] for t in traces]
    assert notices[:3] == [[], [], []]
    assert notices[3] == [lines[told[0]].removeprefix("kvcache serve: sum-1: ")]


def test_a_notice_every_session_repeats_is_told_once_and_traced_each_time(tmp_path: Path) -> None:
    """An upstream without embeddings: every new session's turn says so; stderr tells it
    once (an operator with a thousand sessions gets one line), each trace record keeps it."""
    path = tmp_path / "kvcache.toml"
    path.write_text("[cache]\ngenerate_cache_embeddings = true\n")
    with FakeLlamaServer(n_ctx=4096, embeddings=False) as upstream:
        with ServeProcess(tmp_path, tmp_path / "kv.db", upstream.url, config=path) as serve:
            for n in range(3):
                answer = serve.post(
                    "/v1/chat/completions",
                    {"messages": [user(f"Which harbour town, number {n}?")]},
                    headers={"X-Session-Id": f"plain-{n}"},
                )
                assert answer.status_code == 200, answer.text
            serve.terminate()
    told = [
        line for line in serve.stderr.splitlines() if "embeddings" in line and "kvcache serve: plain-" in line
    ]
    assert len(told) == 1 and told[0].startswith("kvcache serve: plain-0: "), serve.stderr
    traced = [t["notices"] for t in serve.traces()]
    assert len(traced) == 3 and all(any("embeddings" in n for n in notices) for notices in traced)


# ----------------------------------------------------------------------------- D4 abandoned stream
def test_an_abandoned_streams_log_line_says_the_client_went_away(
    tmp_path: Path, fake: FakeLlamaServer
) -> None:
    """The 200 of a stream went out with its headers; when the client leaves before the
    reply is whole, the request's line says so (the trace says 499)."""
    config = write_config(tmp_path)
    with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, config=config) as serve:
        fake.stream_delay = 0.05
        try:
            with serve.stream("left-1", "Stream a long answer please", timeout=30) as resp:
                assert resp.status_code == 200
                next(resp.iter_lines())  # one event, then the connection is closed
            deadline = time.monotonic() + 20
            while not [t for t in serve.traces() if t.get("status") == 499]:
                assert time.monotonic() < deadline, serve.stderr
                time.sleep(0.05)
        finally:
            fake.stream_delay = 0.0
        serve.terminate()  # its stderr is whole once it has stopped
    line = next(ln for ln in serve.stderr.splitlines() if "session=left-1" in ln)
    assert line.startswith("POST /v1/chat/completions 200 ") and line.endswith(" error=client went away")
    assert stored(serve.db, "left-1") == [("user", "Stream a long answer please")]


# ----------------------------------------------------------------------------- small things
def test_a_wrong_method_is_an_invalid_request(serve: ServeProcess) -> None:
    answer = requests.get(serve.url + "/v1/chat/completions", timeout=10)
    assert answer.status_code == 405
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert answer.json()["error"]["code"] == "method_not_allowed"


def test_any_user_label_names_a_session_and_the_header_stays_strict(serve: ServeProcess) -> None:
    """OpenAI clients put any end-user label in ``user``: one that is not a session id
    names the session derived from it (the same one every time); ``X-Session-Id`` is
    still refused unless it is a valid id."""
    api = serve.openai()
    expected = "user-" + hashlib.sha256(b"John Smith").hexdigest()[:24]
    history = [user("Hello, I am John.")]
    raw = api.chat.completions.with_raw_response.create(model="m", messages=history, user="John Smith")
    assert raw.headers["x-kvcache-session"] == expected
    history.append(assistant(raw.parse().choices[0].message.content))
    history.append(user("What is my name?"))
    raw = api.chat.completions.with_raw_response.create(model="m", messages=history, user="John Smith")
    assert (raw.headers["x-kvcache-session"], raw.headers["x-kvcache-turn"]) == (expected, "extend")
    history.append(assistant(raw.parse().choices[0].message.content))
    assert stored(serve.db, expected) == as_rows(history)
    raw = api.chat.completions.with_raw_response.create(
        model="m", messages=[user("hi")], user="jane.doe@example.org"
    )
    assert raw.headers["x-kvcache-session"] == "jane.doe@example.org"  # a valid id as it is
    refused = requests.post(
        serve.url + "/v1/chat/completions",
        json={"messages": [user("hi")]},
        headers={"X-Session-Id": "John Smith"},
        timeout=30,
    )
    assert refused.status_code == 400 and "session id" in refused.json()["error"]["message"]


def test_serve_help_shows_where_host_and_port_come_from(tmp_path: Path) -> None:
    shown = run_kvcache("serve", "--help", home=tmp_path, timeout=60)
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "127.0.0.1, or [serve] host" in text
    assert "8088, or [serve] port" in text


# ----------------------------------------------------------------------------- D3 stop grace
@pytest.mark.slow
def test_a_stream_still_running_when_the_stop_grace_ends_is_cut_off_in_one_line(
    tmp_path: Path, fake: FakeLlamaServer
) -> None:
    """SIGTERM lets a stream run on for the 30 s grace; one still running then is cut
    off: its request's line says so (no traceback), its reply is not stored, and serve
    exits 0."""
    config = write_config(tmp_path)
    serve = ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, config=config)
    fake.stream_delay = 4.0  # a reply of many events: far beyond the grace
    try:
        with serve.stream("cut-1", "Tell me a long story about a lighthouse", timeout=120) as resp:
            lines = resp.iter_lines()
            next(lines)
            serve.proc.send_signal(signal.SIGTERM)
            events = [ln for ln in lines if ln]  # the stream ends when it is cut off
        code = serve.proc.wait(timeout=90)
    finally:
        fake.stream_delay = 0.0
        serve.stop()
    assert code == 0
    assert b"data: [DONE]" not in events
    err = serve.stderr
    assert "Traceback" not in err and "Exception in ASGI application" not in err, err
    line = next(ln for ln in err.splitlines() if "session=cut-1" in ln)
    assert line.startswith("POST /v1/chat/completions 200 ")
    assert line.endswith(" error=cut off: still running when the stop's grace ended"), line
    assert err.splitlines()[-1] == "kvcache serve: stopped"
    assert stored(tmp_path / "kv.db", "cut-1") == [("user", "Tell me a long story about a lighthouse")]
