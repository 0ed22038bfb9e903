"""Managing sessions (issue 17, item 2): ``sessions``, ``export`` and ``forget``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kvcache_cli.cli.app import app
from kvcache_cli.store.backend import Store, open_store
from kvcache_cli.store.migrations import utcnow
from tests.helpers import EXAMPLES
from tests.pg import store_factory, store_url  # noqa: F401  (fixtures)

SUPPORT = "support-4821"  # the session of examples/support-chat.json


def cli(*args: str | Path, stdin: str | None = None) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], input=stdin, env={"COLUMNS": "200"})


def ok(*args: str | Path, stdin: str | None = None) -> Any:
    result = cli(*args, stdin=stdin)
    assert result.exit_code == 0, result.stderr
    return result


def rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    store = open_store(url)
    try:
        return store.query(sql, params)
    finally:
        store.close()


def stored(url: str, session: str) -> list[tuple[Any, ...]]:
    """A session's messages as stored: (role, name, content, timestamp)."""
    return rows(
        url,
        "SELECT m.role, m.name, m.content, m.timestamp FROM messages m "
        "JOIN sessions s ON s.id = m.session_id WHERE s.key = ? ORDER BY m.message_index",
        (session,),
    )


def tables_with_session_id(store: Store) -> list[str]:
    """Every table holding a ``session_id`` column (so a new table is checked too)."""
    if store.is_sqlite:
        names = [n for (n,) in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return [
            n
            for n in names
            if not n.startswith("message_fts")
            and any(col[1] == "session_id" for col in store.query(f"PRAGMA table_info({n})"))
        ]
    return [
        n
        for (n,) in store.query(
            "SELECT table_name FROM information_schema.columns "
            "WHERE column_name = 'session_id' AND table_schema = current_schema()"
        )
    ]


@pytest.fixture
def support(store_url: str) -> Iterator[str]:  # noqa: F811
    """A store with examples/support-chat.json replayed and sharegpt.json imported."""
    ok("--db", store_url, "-q", "process", EXAMPLES / "support-chat.json")
    ok("--db", store_url, "-q", "import", EXAMPLES / "sharegpt.json")
    yield store_url


def test_sessions_lists_counts_and_filters_by_idle_time(support: str) -> None:
    data = json.loads(ok("--db", support, "sessions", "--json").stdout)
    by_key = {s["session_id"]: s for s in data["sessions"]}
    assert data["count"] == len(by_key) == 4
    row = by_key[SUPPORT]
    assert (row["messages"], row["turns"], row["clears"]) == (95, 47, 2)
    assert row["cache_bytes"] > 0 and row["snapshots"] >= 1
    assert row["last_activity"].endswith("+00:00")
    table = ok("--db", support, "sessions").stdout
    assert "last activity (UTC)" in table and SUPPORT in table and "4 sessions" in table
    old = utcnow() - timedelta(hours=30)
    store = open_store(support)
    try:  # the support session went quiet 30 hours ago
        store.transaction(
            lambda: store.query("UPDATE sessions SET last_activity = ? WHERE key = ?", (old, SUPPORT))
        )
    finally:
        store.close()
    idle = json.loads(ok("--db", support, "sessions", "--idle-over", "24", "--json").stdout)
    assert [s["session_id"] for s in idle["sessions"]] == [SUPPORT]
    assert idle["idle_over_hours"] == 24


def test_export_then_process_into_a_new_store_gives_the_same_messages(
    store_factory: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    first, second, third = store_factory("first"), store_factory("second"), store_factory("third")
    ok("--db", first, "-q", "process", EXAMPLES / "support-chat.json")
    native = tmp_path / "native.json"
    written = json.loads(ok("--db", first, "export", SUPPORT, "-o", native, "--json").stdout)
    assert written == {"session_id": SUPPORT, "format": "native", "path": str(native), "messages": 95}
    assert native.stat().st_mode & 0o077 == 0  # owner-only, like the store
    ok("--db", second, "-q", "process", native)
    assert stored(second, SUPPORT) == stored(first, SUPPORT)
    assert len(stored(first, SUPPORT)) == 95
    openai = ok("--db", first, "export", SUPPORT, "--format", "openai").stdout  # on stdout
    assert isinstance(json.loads(openai), list)
    ok("--db", third, "-q", "process", "--session", SUPPORT, "-", stdin=openai)
    without_time = [row[:3] for row in stored(first, SUPPORT)]
    assert [row[:3] for row in stored(third, SUPPORT)] == without_time


def test_export_of_an_unknown_session_is_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    ok("--db", db, "-q", "import", EXAMPLES / "sharegpt.json")
    result = cli("--db", db, "export", "nope")
    assert result.exit_code == 2 and "no session 'nope'" in result.stderr


def test_forget_removes_everything_of_the_session_in_one_go(support: str) -> None:
    store = open_store(support)
    try:
        (sid,) = store.query("SELECT id FROM sessions WHERE key = ?", (SUPPORT,))[0]
        message_id = store.query("SELECT MIN(id) FROM messages WHERE session_id = ?", (sid,))[0][0]
        store.transaction(  # an embedding, as a server with /v1/embeddings would have stored
            lambda: store.query(
                "INSERT INTO embeddings (message_id, model, dim, vector, created_at) VALUES (?, ?, ?, ?, ?)",
                (message_id, "m", 1, b"\0\0\0\0", utcnow()),
            )
        )
        tables = tables_with_session_id(store)
    finally:
        store.close()
    assert {"messages", "cache_entries", "snapshots", "summaries", "turn_log"} <= set(tables)
    search = ("--db", support, "retrieve", "--all-sessions", "scheduler", "--json")
    before_found = [r["session_id"] for r in json.loads(ok(*search).stdout)["results"]]
    assert set(before_found) == {SUPPORT}
    others_before = rows(support, "SELECT COUNT(*) FROM messages WHERE session_id <> ?", (sid,))

    plan = json.loads(ok("--db", support, "forget", SUPPORT, "--dry-run", "--json").stdout)
    [item] = plan["sessions"]
    assert plan["dry_run"] is True and plan["forgotten"] == 0
    assert item["rows"]["messages"] == 95 and item["rows"]["embeddings"] == 1
    assert item["rows"]["snapshots"] >= 1 and item["rows"]["summaries"] == 1
    assert len(stored(support, SUPPORT)) == 95  # a dry run changes nothing

    refused = cli("--db", support, "forget", SUPPORT)  # not a terminal, no --yes
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    unknown = cli("--db", support, "forget", SUPPORT, "nope", "--yes")  # all or nothing
    assert unknown.exit_code == 2 and "no session 'nope'" in unknown.stderr
    assert len(stored(support, SUPPORT)) == 95

    done = json.loads(ok("--db", support, "forget", SUPPORT, "--yes", "--json").stdout)
    assert done["forgotten"] == 1 and done["sessions"][0]["rows"] == item["rows"]
    for table in tables:
        assert rows(support, f"SELECT COUNT(*) FROM {table} WHERE session_id = ?", (sid,)) == [(0,)], table
    assert rows(support, "SELECT COUNT(*) FROM sessions WHERE key = ?", (SUPPORT,)) == [(0,)]
    assert rows(support, "SELECT COUNT(*) FROM embeddings") == [(0,)]
    assert rows(support, "SELECT COUNT(*) FROM operations WHERE session_key = ?", (SUPPORT,)) == [(0,)]
    assert rows(support, "SELECT COUNT(*) FROM messages WHERE session_id <> ?", (sid,)) == others_before
    # the full-text index forgot it too: a word only the support chat has finds nothing
    found = json.loads(ok(*search).stdout)
    assert found["results"] == [] and before_found
    assert SUPPORT not in ok("--db", support, "sessions").stdout


def test_forget_asks_on_a_terminal(tmp_path: Path) -> None:
    """A real terminal on stdin (a pty): forget asks, and only 'y' deletes."""
    import os
    import pty
    import subprocess

    from tests.helpers import cli_env, kvcache_command

    db = tmp_path / "kv.db"
    ok("--db", db, "-q", "import", EXAMPLES / "sharegpt.json")
    for answer, code, left in (("n", 1, 1), ("y", 0, 0)):
        master, slave = pty.openpty()
        try:
            proc = subprocess.Popen(
                [*kvcache_command(), "--db", str(db), "forget", "sharegpt-sql-window"],
                stdin=slave,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=cli_env(tmp_path / "home"),
            )
            os.write(master, f"{answer}\n".encode())
            out, err = proc.communicate(timeout=120)
        finally:
            os.close(slave)
            os.close(master)
        assert proc.returncode == code, err
        assert "Forget sharegpt-sql-window (4 messages) for good?" in err
        assert rows(str(db), "SELECT COUNT(*) FROM sessions WHERE key = 'sharegpt-sql-window'") == [(left,)]
