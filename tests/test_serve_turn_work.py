"""What one ``kvcache serve`` turn asks of the upstream and the store, and when: the
client waits only for the question's token count, the chat and the store work of the
question; the reply (with the session's live view) is stored and the turn's vectors are
embedded after the answer, before the session's lock is released; the reply's token
count is the one the upstream reports for what it generated."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvcache_cli.config import Config
from kvcache_cli.engine.memory import TEMPLATE_TOKENS
from kvcache_cli.server.context import TokenBudget
from kvcache_cli.server.metrics import Metrics
from kvcache_cli.server.protocol import ChatCompletionRequest
from kvcache_cli.server.serving_chat import ChatService, TurnResult
from kvcache_cli.server.trace import TraceWriter
from kvcache_cli.server.upstream import Upstream
from kvcache_cli.services.llm_setup import llm_client
from kvcache_cli.store.backend import Store, open_store
from tests.fake_llama_server import FakeLlamaServer


@pytest.fixture()
def fake() -> Iterator[FakeLlamaServer]:
    with FakeLlamaServer(n_ctx=8192) as server:
        yield server


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    store = open_store(tmp_path / "kv.db")
    yield store
    store.close()


def _service(store: Store, fake: FakeLlamaServer) -> ChatService:
    config = Config()
    assert config.cache.generate_cache_embeddings  # the default this test is about
    llm = llm_client(dataclasses.replace(config.llm, base_url=fake.url), fake.url, required=True)
    return ChatService(store, config, Upstream(fake.url, None, 5, 60), llm, Metrics(), n_ctx=8192)


def _ask(service: ChatService, history: list[dict[str, Any]], key: str) -> TurnResult:
    body = {"model": "m", "messages": history, "max_tokens": 32}
    return service.handle(ChatCompletionRequest.model_validate(body), body, key)


def _paths(fake: FakeLlamaServer) -> list[str]:
    paths = [r.path for r in fake.requests]
    fake.clear_requests()
    return paths


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_a_turn_embeds_after_its_answer_and_stores_its_reply_and_live_view_at_once(
    tmp_path: Path, store: Store, fake: FakeLlamaServer
) -> None:
    service = _service(store, fake)
    history: list[dict[str, Any]] = [{"role": "system", "content": "You answer briefly."}]
    for turn in range(4):
        history.append({"role": "user", "content": f"Turn {turn}: name one harbour town, please."})
        fake.clear_requests()
        result = _ask(service, history, "work-1")
        assert result.body is not None and result.after is not None
        during = _paths(fake)
        # while the client waits: the question's count and the chat; no embeddings
        assert "/v1/embeddings" not in during and during.count("/v1/chat/completions") == 1
        assert during.count("/tokenize") == (2 if turn == 0 else 1)  # the new messages (the reply: usage)
        reply = result.body["choices"][0]["message"]["content"]
        history.append({"role": "assistant", "content": reply})
        stored = _rows(tmp_path / "kv.db", "SELECT role, content FROM messages ORDER BY message_index")
        assert stored == [(m["role"], m["content"]) for m in history[:-1]]  # the reply: once sent
        assert result.body["kvcache"]["stored"] is True
        result.after()
        stored = _rows(tmp_path / "kv.db", "SELECT role, content FROM messages ORDER BY message_index")
        assert stored == [(m["role"], m["content"]) for m in history]
        meta = json.loads(_rows(tmp_path / "kv.db", "SELECT metadata FROM sessions")[0][0])
        assert meta["serve"]["last_prompt_tokens"] == result.body["usage"]["prompt_tokens"]
        assert _paths(fake) == ["/v1/embeddings"]  # one call for the turn's messages
        missing = _rows(
            tmp_path / "kv.db",
            "SELECT COUNT(*) FROM messages m LEFT JOIN embeddings e ON e.message_id = m.id "
            "WHERE e.id IS NULL",
        )
        assert missing == [(0,)]
        tokens = _rows(tmp_path / "kv.db", "SELECT tokens FROM messages ORDER BY message_index DESC LIMIT 1")
        assert tokens == [(result.body["usage"]["completion_tokens"] + TEMPLATE_TOKENS,)]


def test_the_session_stays_locked_until_the_turn_after_its_answer_ran(
    store: Store, fake: FakeLlamaServer
) -> None:
    service = _service(store, fake)
    history = [{"role": "user", "content": "Which river runs through the harbour town?"}]
    result = _ask(service, history, "work-2")
    assert result.after is not None
    assert service.locks.in_progress == 1  # what /health reports as turns_in_progress
    with service.locks.held("work-2", timeout=0.05) as got:
        assert not got  # the turn is not over: its reply and vectors are still to come
    result.after()
    result.after()  # runs once
    assert service.locks.in_progress == 0
    with service.locks.held("work-2", timeout=0.05) as got:
        assert got


def test_a_session_lock_is_dropped_once_no_turn_uses_it(store: Store, fake: FakeLlamaServer) -> None:
    """A server that runs for days keeps no lock per session it ever saw."""
    service = _service(store, fake)
    for n in range(20):
        result = _ask(service, [{"role": "user", "content": f"Question {n} about the harbour?"}], f"s-{n}")
        assert result.after is not None
        assert len(service.locks) == 1
        result.after()
    assert len(service.locks) == 0 and service.locks.in_progress == 0


def test_a_question_retrieval_searches_with_is_embedded_before_the_answer(
    store: Store, fake: FakeLlamaServer
) -> None:
    service = _service(store, fake)
    history: list[dict[str, Any]] = [{"role": "user", "content": "My locker code is 73519, remember it."}]
    first = _ask(service, history, "work-3")
    assert first.body is not None and first.after is not None
    first.after()
    history.append({"role": "assistant", "content": first.body["choices"][0]["message"]["content"]})
    history.append({"role": "user", "content": "What was my locker code that I told you earlier?"})
    fake.clear_requests()
    second = _ask(service, history, "work-3")
    assert second.after is not None
    assert "/v1/embeddings" in _paths(fake)  # the recall question: its vector is searched with
    second.after()


def test_the_token_budget_learns_from_answered_prompts_only_when_it_next_counts() -> None:
    asked: list[list[str]] = []

    def count(texts: list[str]) -> list[int]:
        asked.append(list(texts))
        return [len(t.split()) for t in texts]

    budget = TokenBudget(count)
    prompt = [{"role": "user", "content": "one two three"}] * 4
    budget.observe(prompt, 4 * 3 + 4 * 5 + budget.fixed)  # the template costs 5 per message
    assert asked == [] and budget.per_message == 12  # nothing counted yet: still pessimistic
    assert budget.bound(prompt) >= 4 * 3 + 4 * 5 + budget.fixed
    assert budget.counts(prompt[:1]) == [3 + 6]  # learned first: 5, and one of margin
    assert len(asked) == 2
    budget.counts(prompt[:1])
    assert len(asked) == 3  # learned once


def test_a_reply_whose_write_fails_is_said_and_its_next_turn_stores_it(
    tmp_path: Path, store: Store, fake: FakeLlamaServer
) -> None:
    """The answer is out before its reply's transaction: a failed write is the log line's
    error and the trace's ``stored: false``, and the client's next turn, which carries the
    reply, stores it as one of its messages (the session goes on, no branch)."""
    service = _service(store, fake)
    service.trace = TraceWriter(str(tmp_path / "trace.jsonl"))
    question = {"role": "user", "content": "Which harbour town has the oldest lighthouse?"}
    first = _ask(service, [question], "fail-1")
    assert first.body is not None and first.after is not None
    reply = first.body["choices"][0]["message"]
    with sqlite3.connect(tmp_path / "kv.db") as conn:  # the reply's insert fails (a real SQLite error)
        conn.execute(
            "CREATE TRIGGER no_reply BEFORE INSERT ON messages WHEN NEW.role = 'assistant' "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
    first.after()
    assert first.log["stored"] is False and "injected failure" in first.log["error"]
    assert service.metrics.reply_store_errors._value.get() == 1
    assert [r["stored"] for r in _traces(tmp_path)] == [False]
    assert service.locks.in_progress == 0
    with sqlite3.connect(tmp_path / "kv.db") as conn:
        conn.execute("DROP TRIGGER no_reply")
    history = [question, {"role": "assistant", "content": reply["content"]}]
    history.append({"role": "user", "content": "And the newest one?"})
    second = _ask(service, history, "fail-1")
    assert second.headers["X-KVCache-Turn"] == "extend" and second.after is not None
    second.after()
    stored = _rows(tmp_path / "kv.db", "SELECT role, content FROM messages ORDER BY message_index")
    assert stored[:3] == [(m["role"], m["content"]) for m in history]
    assert [r["stored"] for r in _traces(tmp_path)] == [False, True]


def test_a_regenerated_reply_is_stored_before_its_answer(
    tmp_path: Path, store: Store, fake: FakeLlamaServer
) -> None:
    """A regenerate replaces a stored reply: it is stored before the answer goes back, so a
    failed write is an error to the client, never a client and store that disagree."""
    service = _service(store, fake)
    question = [{"role": "user", "content": "Name a harbour town, please."}]
    first = _ask(service, question, "regen-1")
    assert first.after is not None
    first.after()
    body = {"model": "m", "messages": question, "max_tokens": 3}  # a shorter reply this time
    again = service.handle(ChatCompletionRequest.model_validate(body), body, "regen-1")
    assert again.headers["X-KVCache-Turn"] == "regenerate" and again.body is not None
    assert first.body is not None
    new_reply = again.body["choices"][0]["message"]["content"]
    assert new_reply != first.body["choices"][0]["message"]["content"]
    stored = _rows(tmp_path / "kv.db", "SELECT role, content FROM messages ORDER BY message_index")
    assert stored[-1] == ("assistant", new_reply)  # before after()
    assert again.after is not None
    again.after()


def _traces(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "trace.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
