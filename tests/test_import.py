"""``kvcache import``: bulk history import, idempotent re-import, all-or-nothing files, streaming."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from kvcache_cli.errors import BadInputError
from kvcache_cli.loaders import iter_file
from kvcache_cli.services.importing import import_file
from kvcache_cli.store.backend import open_store
from tests.helpers import invoke

CONVS: list[dict[str, Any]] = [
    {
        "id": "alpha",
        "conversations": [
            {"from": "human", "value": "How do I configure the postgres streaming replica?"},
            {"from": "gpt", "value": "Set primary_conninfo and create standby.signal."},
            {"from": "human", "value": "And the zebra crossing near the office?"},
            {"from": "gpt", "value": "It is repainted every spring."},
        ],
    },
    {
        "id": "beta",
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "human", "value": "What is a kangaroo?"},
            {"from": "gpt", "value": "A marsupial from Australia."},
        ],
    },
]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def rows(db: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_import_stores_messages_and_makes_them_searchable(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "chats.jsonl", CONVS)
    db = tmp_path / "kv.db"
    rc, out, err = invoke("import", src, "--json", home=tmp_path / "home", db=db)
    assert rc == 0, err
    data = json.loads(out)
    assert data["messages_added"] == 7
    assert data["files"][0]["sessions_created"] == 2
    stored = rows(
        db,
        "SELECT s.key, m.message_index, m.role, m.content FROM messages m JOIN sessions s "
        "ON s.id = m.session_id ORDER BY s.key, m.message_index",
    )
    expected = [
        (conv["id"], i, {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), t["value"])
        for conv in CONVS
        for i, t in enumerate(conv["conversations"])
    ]
    assert stored == expected
    # user messages count as turns, as process counts them
    assert rows(db, "SELECT key, turn_count FROM sessions ORDER BY key") == [("alpha", 2), ("beta", 1)]
    # history only: no cache entries, snapshots or turn log
    assert rows(db, "SELECT COUNT(*) FROM cache_entries")[0][0] == 0
    assert rows(db, "SELECT COUNT(*) FROM snapshots")[0][0] == 0
    rc, out, err = invoke("retrieve", "alpha", "postgres replica", "--json", home=tmp_path / "home", db=db)
    assert rc == 0, err
    texts = [r["text"] for r in json.loads(out)["results"]]
    # the matching question and its answer come first, the answer at least as high (issue 18)
    assert texts[:2] == [
        "Set primary_conninfo and create standby.signal.",
        CONVS[0]["conversations"][0]["value"],
    ]
    rc, out, err = invoke("retrieve", "--all-sessions", "kangaroo", "--json", home=tmp_path / "home", db=db)
    assert rc == 0, err
    assert any("kangaroo" in r["text"] for r in json.loads(out)["results"])


def test_reimport_adds_nothing_and_extension_adds_the_rest(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "chats.jsonl", CONVS)
    store = open_store(tmp_path / "kv.db")
    try:
        first = import_file(store, src)
        again = import_file(store, src)
        assert (first.messages_added, again.messages_added, again.sessions_created) == (7, 0, 0)
        longer = json.loads(json.dumps(CONVS))
        longer[1]["conversations"].append({"from": "human", "value": "Do they swim?"})
        write_jsonl(src, longer)
        assert import_file(store, src).messages_added == 1
        rewritten = json.loads(json.dumps(CONVS))
        rewritten[0]["conversations"][1]["value"] = "something else"
        write_jsonl(src, rewritten)
        with pytest.raises(BadInputError, match="differs from the stored conversation"):
            import_file(store, src)
    finally:
        store.close()
    assert rows(tmp_path / "kv.db", "SELECT COUNT(*) FROM messages")[0][0] == 8
    # the index matches the messages
    assert (
        rows(tmp_path / "kv.db", "SELECT COUNT(*) FROM message_fts WHERE message_fts MATCH 'swim'")[0][0] == 1
    )


def test_bad_line_writes_nothing_and_names_file_line_col(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    good = "".join(json.dumps(item) + "\n" for item in CONVS)
    src.write_text(good + '{"id": "gamma", "conversations": [}\n', encoding="utf-8")
    db = tmp_path / "kv.db"
    rc, out, err = invoke("import", src, home=tmp_path / "home", db=db)
    assert rc == 2
    assert f"{src}:3:" in err and "invalid JSON" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert rows(db, "SELECT COUNT(*) FROM messages")[0][0] == 0
    assert rows(db, "SELECT COUNT(*) FROM sessions")[0][0] == 0
    # a bad message (unknown speaker) is refused the same way, naming its place
    src.write_text(good + json.dumps({"id": "g", "conversations": [{"from": "robot", "value": "x"}]}) + "\n")
    rc, out, err = invoke("import", src, home=tmp_path / "home", db=db)
    assert rc == 2 and f"{src}:3:" in err and "robot" in err
    assert rows(db, "SELECT COUNT(*) FROM messages")[0][0] == 0


def test_session_ids_follow_process_rules(tmp_path: Path) -> None:
    plain = tmp_path / "talk.json"
    plain.write_text(
        json.dumps([{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "hello"}])
    )
    many = write_jsonl(
        tmp_path / "many.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(2)]
    )
    db = tmp_path / "kv.db"
    rc, _, err = invoke("import", plain, many, home=tmp_path / "home", db=db)
    assert rc == 0, err
    rc, _, err = invoke("import", plain, "--session", "named", home=tmp_path / "home", db=tmp_path / "kv2.db")
    assert rc == 0, err
    assert [k for (k,) in rows(db, "SELECT key FROM sessions ORDER BY key")] == ["many-1", "many-2", "talk"]
    assert rows(tmp_path / "kv2.db", "SELECT key FROM sessions") == [("named",)]


def test_small_batches_commit_whole_conversations(tmp_path: Path) -> None:
    items = [
        {"id": f"c{i}", "conversations": [{"from": "human", "value": f"word{i} q"}] * 3} for i in range(20)
    ]
    src = write_jsonl(tmp_path / "many.jsonl", items)
    store = open_store(tmp_path / "kv.db")
    try:
        result = import_file(store, src, batch_messages=7)
    finally:
        store.close()
    assert result.messages_added == 60 and result.sessions_created == 20
    assert (
        rows(tmp_path / "kv.db", "SELECT COUNT(*) FROM message_fts WHERE message_fts MATCH 'word13'")[0][0]
        == 3
    )


def test_loader_iterator_streams_jsonl(tmp_path: Path) -> None:
    """``iter_file`` yields a line's conversation before reading the rest of the file."""
    src = tmp_path / "stream.jsonl"
    src.write_text(json.dumps(CONVS[0]) + "\n" + json.dumps(CONVS[1]) + "\n", encoding="utf-8")
    iterator = iter_file(src)
    first = next(iterator)
    assert first.session_key == "alpha" and len(first.messages) == 4
    # the rest of the file changes after the first conversation was read: the iterator
    # reads it only now (a whole-file loader would have parsed the old content)
    with src.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "late", "conversations": [{"from": "human", "value": "x"}]}) + "\n")
    assert [c.session_key for c in iterator] == ["beta", "late"]
