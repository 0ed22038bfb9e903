"""``kvcache serve``: the official openai client against the real server process,
in front of the fake llama-server."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from tests.fake_llama_server import FakeLlamaServer  # noqa: E402
from tests.serve_util import ServeProcess  # noqa: E402

SMALL_CONFIG = """
[cache]
generate_cache_embeddings = false
clear_after_conversations = 16

[snapshot]
"""


def stored(db: Path, session: str) -> list[tuple[str, str]]:
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
    return openai.OpenAI(
        base_url=serve.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs
    )


@pytest.fixture
def fake() -> Iterator[FakeLlamaServer]:
    with FakeLlamaServer(n_slots=2, n_ctx=2048) as srv:
        yield srv


@pytest.fixture
def serve(tmp_path: Path, fake: FakeLlamaServer) -> Iterator[ServeProcess]:
    with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, config=write_config(tmp_path)) as proc:
        yield proc


def test_replies_arrive_intact_and_are_stored(
    serve: ServeProcess, fake: FakeLlamaServer, tmp_path: Path
) -> None:
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
    assert stored(tmp_path / "kv.db", "fruit-1") == [(m["role"], m["content"]) for m in history]
    # the upstream saw the messages unchanged (the history fits)
    sent = [r.body for r in fake.requests if r.path == "/v1/chat/completions"]
    assert sent[-1]["messages"] == history[:-1]
    assert "X-Session-Id" not in json.dumps(sent[-1])
    lines = [ln for ln in serve.stderr.splitlines() if "POST /v1/chat/completions 200" in ln]
    assert len(lines) == 2 and "session=fruit-1" in lines[0]


def test_session_found_by_prefix_and_by_user_field(serve: ServeProcess, tmp_path: Path) -> None:
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
    assert len(stored(tmp_path / "kv.db", key)) == 4
