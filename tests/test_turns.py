"""The live turn API (``begin_turn``/``finish_turn``, regenerate, branch) and ``process``
run one code path: a conversation fed turn by turn ends in the store ``process`` makes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvcache_cli.config import Config
from kvcache_cli.engine.entries import ChatMessage
from kvcache_cli.errors import BadInputError
from kvcache_cli.loaders import Conversation, load_file
from kvcache_cli.services.manager import KVCacheManager
from kvcache_cli.store.backend import Store, open_store
from tests.helpers import conversation, dump_db, write_json

TABLES = ("messages", "cache_entries", "snapshots", "snapshot_entries", "summaries", "turn_log", "engagement")


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    store = open_store(tmp_path / "live.db")
    yield store
    store.close()


def _messages(tmp_path: Path, turns: int) -> list[ChatMessage]:
    [conv] = load_file(write_json(tmp_path / "conv.json", conversation(turns, session_id="conv")))
    return conv.messages


def _content(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """The rows ``process`` and live turns must agree on (times come from the file)."""
    rows = dump_db(path)
    return {table: rows[table] for table in TABLES}


def test_live_turns_store_what_process_stores(tmp_path: Path, store: Store) -> None:
    messages = _messages(tmp_path, 20)
    live = KVCacheManager(store, Config())
    reports = []
    history: list[ChatMessage] = []
    for msg in messages:
        if msg.role == "user":
            history.append(msg)
            outcome = live.begin_turn("conv", history)
            assert outcome.report is not None and outcome.report.message_index == len(history) - 1
            reports.append(outcome.report.to_dict())
        elif history and history[-1].role == "user":
            live.finish_turn("conv", [msg])
            history.append(msg)
        else:
            history.append(msg)  # the system message: stored with the first question
    replayed = open_store(tmp_path / "replayed.db")
    try:
        [conv] = load_file(tmp_path / "conv.json")
        result = KVCacheManager(replayed, Config()).process_conversation(conv, "conv")
    finally:
        replayed.close()
    assert reports == [t.to_dict() for t in result.turns]
    assert any(r["cleared"] for r in reports)  # the 16-turn limit was crossed live too
    assert _content(tmp_path / "live.db") == _content(tmp_path / "replayed.db")


def test_outcome_after_a_clear_has_the_summary_kept_entries_and_context_start(
    tmp_path: Path, store: Store
) -> None:
    messages = _messages(tmp_path, 16)
    manager = KVCacheManager(store, Config())
    earlier, question = messages[:31], messages[31]  # the system message, 15 turns; the 16th question
    assert question.role == "user"
    manager.process_conversation(Conversation("conv", earlier), "conv")
    outcome = manager.begin_turn("conv", [*earlier, question])
    assert outcome.clear is not None and outcome.clear.reason == "ConversationLimit"
    assert outcome.summary and outcome.summary in outcome.clear.bridge_message
    assert outcome.context_start == 31  # the question whose turn made the clear
    assert len(outcome.active) == outcome.clear.entries_preserved > 0
    assert outcome.messages_stored == 1


def test_replace_reply_drops_the_old_answer_everywhere(tmp_path: Path, store: Store) -> None:
    manager = KVCacheManager(store, Config())
    question = ChatMessage(role="user", content="Which port does the staging database listen on?")
    manager.begin_turn("s", [question])
    manager.finish_turn("s", [ChatMessage(role="assistant", content="It listens on port 5433 zebra.")])
    assert manager.retrieve("s", "zebra", tiers=(3,)).entries
    dropped = manager.replace_reply("s", [ChatMessage(role="assistant", content="Port 6543, giraffe.")])
    assert dropped == 1
    stored = sorted(dump_db(tmp_path / "live.db")["messages"], key=lambda r: r[2])
    assert [(r[2], r[3], r[5]) for r in stored] == [
        (0, "user", question.content),
        (1, "assistant", "Port 6543, giraffe."),
    ]
    assert not manager.retrieve("s", "zebra", tiers=(3,)).entries  # gone from the index
    assert manager.retrieve("s", "giraffe", tiers=(3,)).entries
    texts = [e.key_data for e in manager.active_entries("s")]
    assert "It listens on port 5433 zebra." not in texts and "Port 6543, giraffe." in texts


def test_branch_replays_the_common_prefix_into_a_new_session(tmp_path: Path, store: Store) -> None:
    messages = _messages(tmp_path, 6)
    manager = KVCacheManager(store, Config())
    manager.process_conversation(load_file(tmp_path / "conv.json")[0], "conv")
    result = manager.branch_session("conv", "conv-edit", 5)
    assert result.messages_added == 5 and len(result.turns) == 2
    edited = [*messages[:5], ChatMessage(role="user", content="Actually, a different question?")]
    outcome = manager.begin_turn("conv-edit", edited)
    assert outcome.report is not None and outcome.report.message_index == 5
    with pytest.raises(BadInputError):
        manager.begin_turn("conv", edited)  # the original diverges from the edit
    with pytest.raises(BadInputError):
        manager.branch_session("conv", "conv-edit", 3)  # exists already
