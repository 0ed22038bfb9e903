"""Issue 5.7: property tests (hypothesis) for loaders, snapshot/restore and retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache_cli.errors import BadInputError
from kvcache_cli.loaders import load_file
from kvcache_cli.services.manager import KVCacheManager
from kvcache_cli.store.backend import open_store

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
ROLE = st.sampled_from(["user", "assistant", "system", "tool", "wizard", "", 3, None])
MESSAGE = st.fixed_dictionaries(
    {
        "role": ROLE,
        "content": st.one_of(st.text(), st.integers(), st.none(), st.lists(st.text(), max_size=2)),
    },
    optional={"timestamp": st.one_of(st.integers(-(2**40), 2**40), st.text(max_size=30), st.floats())},
)
SHAPED = st.one_of(
    st.fixed_dictionaries(
        {
            "session_id": st.one_of(st.text(max_size=20), st.integers()),
            "messages": st.lists(MESSAGE, max_size=5),
        }
    ),
    st.lists(MESSAGE, max_size=5),
    st.lists(
        st.fixed_dictionaries({"id": st.text(max_size=5), "conversations": st.lists(JSON, max_size=3)}),
        max_size=3,
    ),
)
SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(value=st.one_of(JSON, SHAPED), suffix=st.sampled_from([".json", ".jsonl"]))
def test_loaders_never_crash_on_arbitrary_json(tmp_path: Path, value: object, suffix: str) -> None:
    path = tmp_path / f"f{suffix}"
    path.write_text(json.dumps(value), encoding="utf-8")
    try:
        convs = load_file(path)
    except BadInputError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    for conv in convs:
        for msg in conv.messages:
            assert isinstance(msg.content, str) and isinstance(msg.role, str)


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_loaders_never_crash_on_arbitrary_bytes(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "b.json"
    path.write_bytes(raw)
    try:
        load_file(path)
    except BadInputError:
        pass


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> KVCacheManager:
    from kvcache_cli.engine.entries import ChatMessage
    from kvcache_cli.loaders import Conversation

    db = tmp_path_factory.mktemp("prop") / "kv.db"
    store = open_store(str(db))
    mgr = KVCacheManager(store)
    texts = [
        "kv cache sizing for long context?",
        "use paged attention",
        "what is rope scaling?",
        "it rescales positions",
    ]
    msgs = [ChatMessage(role=("user" if i % 2 == 0 else "assistant"), content=t) for i, t in enumerate(texts)]
    mgr.process_conversation(Conversation("prop", msgs), "prop")
    return mgr


ENTRY_TEXT = st.text(min_size=0, max_size=60)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(ENTRY_TEXT, min_size=0, max_size=8))
def test_snapshot_then_restore_is_identity_on_entries(manager: KVCacheManager, texts: list[str]) -> None:
    from kvcache_cli.engine.entries import ChatMessage
    from kvcache_cli.loaders import Conversation

    key = f"snap-{abs(hash(tuple(texts)))}"
    msgs = [
        ChatMessage(role="user" if i % 2 == 0 else "assistant", content=t or " ") for i, t in enumerate(texts)
    ]
    if msgs:
        manager.process_conversation(Conversation(key, msgs), key)
    else:
        manager.process_conversation(Conversation(key, [ChatMessage(role="user", content="x")]), key)
    before = manager.active_entries(key)
    snap = manager.snapshot(key)
    manager.clear(key)
    manager.restore(key, snap.id)
    after = manager.active_entries(key)
    assert [
        (e.key_hash, e.key_data, e.size_bytes, e.tokens, e.message_index, e.importance_score) for e in after
    ] == [
        (e.key_hash, e.key_data, e.size_bytes, e.tokens, e.message_index, e.importance_score) for e in before
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(max_size=80), all_sessions=st.booleans(), limit=st.integers(1, 30))
def test_retrieval_never_raises_on_arbitrary_text(
    manager: KVCacheManager, query: str, all_sessions: bool, limit: int
) -> None:
    result = manager.retrieve(None if all_sessions else "prop", query, (1, 2, 3), limit)
    assert len(result.entries) <= limit
