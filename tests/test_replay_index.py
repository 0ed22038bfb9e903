"""The replay's in-memory tier-3 index, the ranking fast paths and the engagement decay SQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from kvcache_cli.config import Config
from kvcache_cli.engine.scoring import decayed_engagement, next_engagement
from kvcache_cli.loaders import load_file
from kvcache_cli.retrieval import documents, ranking
from kvcache_cli.retrieval.fusion import RetrievalResult, RetrievedEntry
from kvcache_cli.retrieval.session_index import SessionIndex, SessionIndexes
from kvcache_cli.services.importing import import_file
from kvcache_cli.services.manager import KVCacheManager
from kvcache_cli.services.retrieve import after_retrieval
from kvcache_cli.store import search
from kvcache_cli.store.backend import Store, open_store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUERIES = [
    "When did Tomás move the backfill job?",
    "what was the error in the nightly export",
    "disk space on the replica",
    "who owns the migration runbook?",
    "timeout retry backoff settings",
    "thanks, that fixed it",
]


def _session_id(store, key: str) -> int:  # type: ignore[no-untyped-def]
    return int(store.query("SELECT id FROM sessions WHERE key = ?", (key,))[0][0])


@pytest.fixture
def support(tmp_path: Path) -> Iterator[tuple[Store, int]]:
    """A store (``tmp_path / "s.db"``) holding examples/support-chat.json, and its session id."""
    store = open_store(tmp_path / "s.db")
    try:
        import_file(store, EXAMPLES / "support-chat.json")
        yield store, _session_id(store, "support-4821")
    finally:
        store.close()


def test_unbounded_index_ranks_exactly_like_the_store_search(support: tuple[Store, int]) -> None:
    """With every match a candidate, the index is `kvcache retrieve`'s tier-3 ranking."""
    store, sid = support
    index = SessionIndex(sid)
    index.sync(store)
    compared = 0
    for query in QUERIES:
        want = search.search_messages(store, query, sid, 20)
        got = index.search(query, 20, candidates=10**9)
        assert [(h.message_index, round(h.score, 9), h.matched_keywords) for h in got] == [
            (h.message_index, round(h.score, 9), h.matched_keywords) for h in want
        ], query
        compared += len(want)
    assert compared > 20


def test_candidates_cap_keeps_the_best_matches(support: tuple[Store, int]) -> None:
    store, sid = support
    index = SessionIndex(sid)
    index.sync(store)
    full = index.search("backfill job export error replica", 5, candidates=10**9)
    capped = index.search("backfill job export error replica", 5, candidates=12)
    assert full and capped
    assert capped[0].message_index == full[0].message_index
    assert len({h.message_index for h in capped} & {h.message_index for h in full}) >= 3
    # results can be restricted without changing anyone's context
    kept = index.search("backfill job", 5, candidates=50, keep=lambda i: i % 2 == 0)
    assert kept and all(h.message_index % 2 == 0 for h in kept)


def test_index_follows_another_writer_and_reloads_on_deletes(
    tmp_path: Path, support: tuple[Store, int]
) -> None:
    db = tmp_path / "s.db"
    store, sid = support
    index = SessionIndex(sid)
    index.sync(store)
    before = len(index.docs)
    other = sqlite3.connect(db)
    nxt = max(index.docs) + 1
    other.execute(
        "INSERT INTO messages (session_id, message_index, role, content, tokens, importance) "
        "VALUES (?, ?, 'user', 'zebra crossing quarterly', 8, 0.5)",
        (sid, nxt),
    )
    other.commit()
    index.sync(store)
    assert len(index.docs) == before + 1
    hits = index.search("zebra", 5, 50)  # the new row, then its neighbours on context
    assert [h.message_index for h in hits if h.matched_keywords] == [nxt] == [hits[0].message_index]
    # a row deleted behind the index's back: the count disagrees, the session reloads
    other.execute("DELETE FROM messages WHERE session_id = ? AND message_index = ?", (sid, nxt))
    other.commit()
    other.close()
    index.sync(store)
    assert len(index.docs) == before and index.search("zebra", 5, 50) == []


def test_a_rolled_back_transaction_drops_the_indexes(support: tuple[Store, int]) -> None:
    store, sid = support
    indexes = SessionIndexes()

    def work() -> None:
        indexes.get(store, sid)
        store.query("DELETE FROM messages WHERE session_id = ?", (sid,))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.transaction(work, indexes.forget)
    assert indexes._by_session == {}  # what it read inside the rolled-back work is gone
    (stored,) = store.query("SELECT count(*) FROM messages WHERE session_id = ?", (sid,))[0]
    index = indexes.get(store, sid)
    assert stored > 0 and index is not None and len(index.docs) == stored


def _clear_text_caches() -> None:
    documents.clear_profiles()


def test_rank_texts_gives_the_same_results_for_new_and_known_texts() -> None:
    """The cached-profile fast path changes speed only: cold and known texts rank alike."""
    conv = load_file(EXAMPLES / "support-chat.json")[0]
    texts = [msg.content for msg in conv.messages]
    names = [msg.name for msg in conv.messages]
    for query in QUERIES:
        _clear_text_caches()
        cold = ranking.rank_texts(query, texts, names=names)
        for text in texts:
            documents.profile(text, remember=True)
        known = ranking.rank_texts(query, texts, names=names)
        assert [(p, round(s, 12), m) for p, s, m in known] == [(p, round(s, 12), m) for p, s, m in cold]
        assert ranking.rank_texts(query, texts, names=names, limit=3) == known[:3]


def test_engagement_decay_sql_follows_the_reference_rule(support: tuple[Store, int]) -> None:
    """Untouched keys x0.95 with a 0.1 floor, retrieved keys +0.15; rows at the floor stay."""
    store, _ = support
    manager = KVCacheManager(store, Config())
    session = manager.session("support-4821")
    start = {"a": 0.3, "b": 0.104, "c": 0.1, "d": 0.9}
    for key, score in start.items():
        store.query(
            "INSERT INTO engagement (session_id, key_hash, score) VALUES (?, ?, ?)",
            (session.get_id(), key, score),
        )
    result = RetrievalResult(query="q", strategy="keyword_only")
    result.entries = [
        RetrievedEntry(
            tier=1,
            score=0.5,
            matched_keywords=[],
            text="t",
            session_id="support-4821",
            message_index=0,
            key_hash=k,
        )
        for k in ("d", "new")
    ]
    expected = dict(start)
    for _ in range(3):
        store.transaction(lambda: after_retrieval(manager, session, result, datetime(2025, 1, 1)))
        expected = {
            k: next_engagement(v, retrieved=True) if k in ("d", "new") else decayed_engagement(v)
            for k, v in expected.items()
        }
        expected.setdefault("new", next_engagement(0.3, retrieved=True))
    rows = dict(
        store.query("SELECT key_hash, score FROM engagement WHERE session_id = ?", (session.get_id(),))
    )
    assert rows == pytest.approx(expected)
    assert rows["c"] == 0.1 and rows["b"] == 0.1


def test_speakers_named_without_a_prefix_count_as_the_store_counts_them(tmp_path: Path) -> None:
    """A message whose speaker (``name``) is in the query counts for that word's IDF."""
    import json

    messages = []
    for i in range(12):
        speaker = ("alice", "bob", "carol")[i % 3]
        text = ["hello world from the garden", "the world cup final tonight", "garden tools and seeds"][i % 3]
        messages.append(
            {"role": "user" if i % 2 == 0 else "assistant", "name": speaker, "content": f"{text} {i}"}
        )
    path = tmp_path / "named.json"
    path.write_text(json.dumps({"session_id": "named", "messages": messages}))
    store = open_store(tmp_path / "s.db")
    try:
        import_file(store, path)
        sid = _session_id(store, "named")
        index = SessionIndex(sid)
        index.sync(store)
        for query in ("alice world", "bob garden tools", "carol final", "world"):
            want = search.search_messages(store, query, sid, 10)
            got = index.search(query, 10, candidates=10**9)
            assert want, query
            assert [(h.message_index, round(h.score, 9)) for h in got] == [
                (h.message_index, round(h.score, 9)) for h in want
            ], query
    finally:
        store.close()


def test_a_session_too_big_to_index_is_searched_through_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the cap the replay asks the store's index each turn, and still retrieves."""
    from kvcache_cli.retrieval import session_index

    def replay(cap: int | None) -> tuple[list[int], int]:
        if cap is not None:
            monkeypatch.setattr(session_index, "MAX_INDEXED_MESSAGES", cap)
        store = open_store(tmp_path / f"cap{cap}.db")
        try:
            manager = KVCacheManager(store, Config())
            conv = load_file(EXAMPLES / "support-chat.json")[0]
            result = manager.process_conversation(conv, "support-4821")
            assert manager.replay_indexes._too_big == (
                {_session_id(store, "support-4821")} if cap == 0 else set()
            )
            return [t.retrieved for t in result.turns], sum(1 for t in result.turns if 3 in t.retrieval_tiers)
        finally:
            store.close()

    indexed, tier3_indexed = replay(None)
    through_store, tier3_store = replay(0)
    assert tier3_indexed > 5 and tier3_store > 5
    assert sum(through_store) > 0 and len(through_store) == len(indexed)


def test_a_huge_message_sends_the_session_to_the_store_search(
    support: tuple[Store, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvcache_cli.retrieval import session_index

    monkeypatch.setattr(session_index, "MAX_INDEXED_TEXT", 200)  # support-chat has longer messages
    store, sid = support
    indexes = SessionIndexes()
    assert indexes.get(store, sid) is None and indexes._too_big == {sid}
    indexes.forget()
    monkeypatch.setattr(session_index, "MAX_INDEXED_TEXT", 10**6)
    found = indexes.get(store, sid)
    assert found is not None and found.docs
