"""Library-level tests of the manager: KVCacheManager + open_store on real SQLite files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvcache_cli.config import Config
from kvcache_cli.engine import bridge
from kvcache_cli.engine.entries import entries_hash
from kvcache_cli.engine.memory import estimate_tokens
from kvcache_cli.errors import BadInputError, NotFoundError
from kvcache_cli.loaders import Conversation, load_file
from kvcache_cli.services.manager import KVCacheManager, split_turns
from kvcache_cli.store import models as m
from kvcache_cli.store.backend import Store, open_store
from tests.helpers import EXAMPLES, conversation, dump_db, truncated, write_json


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "kv.db")
    yield s
    s.close()


def load(tmp_path: Path, data: dict, name: str = "conv.json") -> Conversation:
    [conv] = load_file(write_json(tmp_path / name, data))
    return conv


def clears(result) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    return [(c.turn, c.reason) for c in result.clears]


def test_defaults_give_the_reference_capacity() -> None:
    manager_config = Config()
    assert manager_config.model.bytes_per_token == 128 * 1024
    assert manager_config.model.n_ctx * manager_config.model.bytes_per_token == 4096 * 128 * 1024
    assert estimate_tokens("x" * 9) == 3 + 4


def test_short_conversation_clears_at_16_and_32(store: Store, tmp_path: Path) -> None:
    manager = KVCacheManager(store, Config())
    result = manager.process_conversation(load(tmp_path, conversation(40)), "conv")
    assert len(result.turns) == 40
    assert clears(result) == [(16, "ConversationLimit"), (32, "ConversationLimit")]
    assert max(result.to_dict()["usage"]) / result.capacity_bytes < 0.6
    session = store.bind(m.Session.select().where(m.Session.key == "conv")).get()
    assert session.total_clears == 2
    assert session.conversation_count == 8


def test_long_messages_clear_earlier_by_memory(store: Store, tmp_path: Path) -> None:
    manager = KVCacheManager(store, Config())
    result = manager.process_conversation(load(tmp_path, conversation(40, long=True)), "conv")
    reasons = clears(result)
    assert reasons, "long messages never cleared"
    assert reasons[0][0] < 16
    assert reasons[0][1] == "MemoryThreshold"
    first = result.turns[reasons[0][0] - 1]
    assert first.cache_size_bytes / result.capacity_bytes >= 0.6
    # every turn before the first clear stayed under the threshold
    assert all(t.cache_size_bytes / result.capacity_bytes < 0.6 for t in result.turns[: reasons[0][0] - 1])
    # every memory clear makes room: it frees entries and keeps at most half the threshold
    for clear in result.clears:
        assert clear.entries_cleared > 0
    # and no turn ever goes over capacity (the reference design's size-blind preservation did)
    assert all(t.cache_size_bytes <= result.capacity_bytes for t in result.turns)


def test_example_files_clear_as_documented(store: Store) -> None:
    manager = KVCacheManager(store, Config())
    [support] = load_file(EXAMPLES / "support-chat.json")
    assert len(split_turns(support.messages)) >= 45
    result = manager.process_conversation(support, "support")
    assert clears(result) == [(16, "ConversationLimit"), (32, "ConversationLimit")]
    [long] = load_file(EXAMPLES / "long-messages.json")
    result = manager.process_conversation(long, "long")
    assert result.clears and result.clears[0].reason == "MemoryThreshold" and result.clears[0].turn < 16
    assert all(c.entries_cleared > 0 for c in result.clears)
    assert sum(e.size_bytes for e in manager.active_entries("long")) <= 0.6 * result.capacity_bytes


def test_replay_is_idempotent(store: Store, tmp_path: Path) -> None:
    conv = load(tmp_path, conversation(20))
    manager = KVCacheManager(store, Config())
    manager.process_conversation(conv, "conv")
    before = dump_db(tmp_path / "kv.db")
    again = manager.process_conversation(conv, "conv")
    assert again.messages_added == 0 and again.turns == []
    assert dump_db(tmp_path / "kv.db") == before


def test_extension_processes_only_new_turns(store: Store, tmp_path: Path) -> None:
    data = conversation(30)
    manager = KVCacheManager(store, Config())
    first = manager.process_conversation(load(tmp_path, truncated(data, 1 + 2 * 20), "a.json"), "conv")
    assert len(first.turns) == 20
    second = manager.process_conversation(load(tmp_path, data, "b.json"), "conv")
    assert len(second.turns) == 10
    assert second.messages_added == 20
    assert [t.turn for t in second.turns] == list(range(21, 31))
    assert store.bind(m.Message.select()).count() == 61


def test_divergent_file_is_refused_with_the_index(store: Store, tmp_path: Path) -> None:
    data = conversation(10)
    manager = KVCacheManager(store, Config())
    manager.process_conversation(load(tmp_path, data, "a.json"), "conv")
    changed = truncated(data, len(data["messages"]))
    changed["messages"][7]["content"] = "something else entirely"
    before = dump_db(tmp_path / "kv.db")
    with pytest.raises(BadInputError, match=r"message 7 differs"):
        manager.process_conversation(load(tmp_path, changed, "b.json"), "conv")
    assert dump_db(tmp_path / "kv.db") == before


def test_prior_summary_bridge_and_cumulative_summary(store: Store, tmp_path: Path) -> None:
    manager = KVCacheManager(store, Config())
    data = conversation(40)
    data["messages"][1]["content"] = "Turn 1: my name is Aurelia and the budget is 4200 euros."
    result = manager.process_conversation(load(tmp_path, data), "conv")
    turn16, turn17 = result.turns[15], result.turns[16]
    assert turn16.clear is not None
    assert turn16.bridge_messages[0].startswith(bridge.SUMMARY_NOW)
    assert turn17.clear is None
    assert turn17.bridge_messages[0].startswith(bridge.SUMMARY_PRIOR)
    summary = store.bind(m.Summary.select()).get()
    assert summary.clear_count == 2
    assert "Aurelia" in summary.text and "4200" in summary.text
    assert result.turns[31].bridge_messages[0].startswith(bridge.SUMMARY_NOW)
    assert "Aurelia" in result.turns[32].bridge_messages[0]


def test_first_summary_bullets_survive_the_second_clear(store: Store, tmp_path: Path) -> None:
    manager = KVCacheManager(store, Config())
    data = conversation(40)
    manager.process_conversation(load(tmp_path, truncated(data, 1 + 2 * 16), "a.json"), "conv")
    first = store.bind(m.Summary.select()).get().text
    manager.process_conversation(load(tmp_path, data, "b.json"), "conv")
    second = store.bind(m.Summary.select()).get()
    assert second.clear_count == 2
    old_bullets = [ln for ln in first.splitlines() if ln.startswith("- ")]
    assert old_bullets and all(b in second.text for b in old_bullets)
    assert len(second.text) > len(first)


def test_snapshot_restore_returns_the_same_entries(store: Store, tmp_path: Path) -> None:
    manager = KVCacheManager(store, Config())
    manager.process_conversation(load(tmp_path, conversation(10)), "conv")
    active = manager.active_entries("conv")
    snap = manager.snapshot("conv")
    assert snap.entry_count == len(active) and snap.state_hash == entries_hash(active)
    manager.clear("conv")
    assert len(manager.active_entries("conv")) < len(active)
    restored = manager.restore("conv", snap.id)
    assert restored.entries_restored == len(active)
    after = manager.active_entries("conv")
    assert [e.identity() for e in after] == [e.identity() for e in active]
    assert entries_hash(after) == snap.state_hash
    assert restored.bridge_message.startswith("[Cache Restoration] Restored ")


def test_unknown_session_and_snapshot(store: Store, tmp_path: Path) -> None:
    manager = KVCacheManager(store, Config())
    manager.process_conversation(load(tmp_path, conversation(3)), "conv")
    before = dump_db(tmp_path / "kv.db")
    with pytest.raises(NotFoundError):
        manager.clear("nosuch")
    with pytest.raises(NotFoundError):
        manager.restore("conv", 9999)
    with pytest.raises(NotFoundError):
        manager.snapshot("nosuch")
    assert dump_db(tmp_path / "kv.db") == before


def test_statistics_match_process_results(store: Store, tmp_path: Path) -> None:
    manager = KVCacheManager(store, Config())
    results = [
        manager.process_conversation(load(tmp_path, conversation(40), "a.json"), "a"),
        manager.process_conversation(load(tmp_path, conversation(12, long=True), "b.json"), "b"),
    ]
    stats = manager.statistics()
    dicts = [r.to_dict() for r in results]
    for key in (
        "total_clears",
        "entries_cleared",
        "entries_preserved",
        "total_retrievals",
        "entries_retrieved",
    ):
        assert stats[key] == sum(d[key] for d in dicts), key
    assert stats["total_snapshots"] == sum(d["snapshots_created"] for d in dicts)
    assert stats["message_count"] == sum(d["messages_added"] for d in dicts)


def test_clear_preserves_system_prompt(store: Store, tmp_path: Path) -> None:
    manager = KVCacheManager(store, Config())
    system = "You are the release assistant. You must keep answers short."
    manager.process_conversation(load(tmp_path, conversation(4, system=system, timestamps=False)), "conv")
    info = manager.clear("conv")
    assert info.reason == "Manual"
    kept = manager.active_entries("conv")
    assert any(e.key_type == "system_prompt" for e in kept)
    assert info.entries_cleared + info.entries_preserved == 9
