"""``process`` on a conversation ``import`` stored runs it through the engine, storing
every message once (issue 17, item 9)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from kvcache_cli.cli.app import app
from kvcache_cli.store.backend import open_store
from tests.helpers import EXAMPLES, write_json

SUPPORT_FILE = EXAMPLES / "support-chat.json"
SUPPORT = "support-4821"
ENGINE_KEYS = (
    "turns_processed",
    "total_clears",
    "entries_cleared",
    "entries_preserved",
    "snapshots_created",
    "total_retrievals",
    "entries_retrieved",
    "clears",
    "usage",
)


def run(*args: str | Path) -> Any:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    return result


def processed(db: Path, path: Path) -> dict[str, Any]:
    [session] = json.loads(run("--db", db, "-q", "process", path, "--json", "--turns").stdout)["sessions"]
    return dict(session)


def state(db: Path) -> dict[str, Any]:
    """What the engine left: messages, turn log, snapshots, summary, active cache."""
    store = open_store(db)
    try:
        q = store.query
        return {
            "messages": q(
                "SELECT message_index, role, name, content, tokens FROM messages ORDER BY message_index"
            ),
            "turn_log": q(
                "SELECT turn_index, message_index, cache_size_bytes, entry_count, cleared, clear_reason, "
                "retrieved FROM turn_log ORDER BY turn_index"
            ),
            "snapshots": q("SELECT turn_index, snapshot_type, reason, state_hash FROM snapshots ORDER BY id"),
            "summary": q("SELECT text, messages_summarized, clear_count FROM summaries"),
            "cache": q("SELECT key_hash, size_bytes FROM cache_entries ORDER BY key_hash"),
            "session": q("SELECT turn_count, conversation_count, total_clears, entry_count FROM sessions"),
            "fts": q("SELECT COUNT(*) FROM message_fts"),
        }
    finally:
        store.close()


def test_an_imported_conversation_replays_like_a_fresh_one(tmp_path: Path) -> None:
    fresh, imported = tmp_path / "fresh.db", tmp_path / "imported.db"
    want = processed(fresh, SUPPORT_FILE)
    run("--db", imported, "-q", "import", SUPPORT_FILE)
    got = processed(imported, SUPPORT_FILE)
    assert got["turns_processed"] == 47 and got["total_clears"] == 2  # not "0/95, nothing done"
    for key in (*ENGINE_KEYS, "turns"):
        assert got[key] == want[key], key
    assert got["messages_added"] == 0  # stored once: by the import
    assert any("not stored twice" in n for n in got["notices"])
    assert state(imported) == state(fresh)
    again = processed(imported, SUPPORT_FILE)  # the engine has run it all now
    assert again["turns_processed"] == 0 and state(imported) == state(fresh)


def test_a_processed_start_then_an_imported_rest(tmp_path: Path) -> None:
    data = json.loads(SUPPORT_FILE.read_text(encoding="utf-8"))
    start = write_json(tmp_path / "start.json", dict(data, messages=data["messages"][:30]))
    fresh, mixed = tmp_path / "fresh.db", tmp_path / "mixed.db"
    processed(fresh, SUPPORT_FILE)
    processed(mixed, start)
    run("--db", mixed, "-q", "import", SUPPORT_FILE)  # appends messages 30..94, engine not run
    got = processed(mixed, SUPPORT_FILE)
    assert got["turns_processed"] == 47 - 15 and got["messages_added"] == 0
    assert state(mixed) == state(fresh)


def test_a_shorter_file_leaves_the_imported_messages_alone(tmp_path: Path) -> None:
    data = json.loads(SUPPORT_FILE.read_text(encoding="utf-8"))
    start = write_json(tmp_path / "start.json", dict(data, messages=data["messages"][:30]))
    db = tmp_path / "kv.db"
    run("--db", db, "-q", "import", SUPPORT_FILE)
    got = processed(db, start)
    assert got["turns_processed"] == 0 and any("imported without the engine" in n for n in got["notices"])
    assert len(state(db)["messages"]) == 95


def test_a_store_imported_before_the_mark_existed_replays_too(tmp_path: Path) -> None:
    fresh, old = tmp_path / "fresh.db", tmp_path / "old.db"
    processed(fresh, SUPPORT_FILE)
    run("--db", old, "-q", "import", SUPPORT_FILE)
    store = open_store(old)
    try:  # as an import by an earlier version left it: no mark
        store.transaction(lambda: store.query("UPDATE sessions SET metadata = '{}'"))
    finally:
        store.close()
    assert processed(old, SUPPORT_FILE)["total_clears"] == 2
    assert state(old) == state(fresh)
