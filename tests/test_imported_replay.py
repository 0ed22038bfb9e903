"""``process`` on a conversation ``import`` stored runs it through the engine, storing
every message once (issue 17, item 9)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kvcache_cli.cli.app import app
from kvcache_cli.store.backend import open_store
from tests.helpers import (
    EXAMPLES,
    committed_rows,
    integrity,
    logical_state,
    run_kvcache,
    start_kvcache,
    table_rows,
    uniform_conversation,
    write_json,
)
from tests.pg import store_factory  # noqa: F401  (a fixture)

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


def processed(db: Path | str, path: Path) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------- interruptions
def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def stored_messages(db: Path) -> list[tuple[Any, ...]]:
    """Every stored message with its row id: ``(id, index, role, content)``."""
    return rows(db, "SELECT id, message_index, role, content FROM messages ORDER BY message_index")


def check_interrupted(db: Path, imported: list[tuple[Any, ...]], data: dict[str, Any]) -> int:
    """After a killed replay: every imported message is there, unchanged (same row ids, so
    none was deleted and stored again) and indexed; the mark is at a turn boundary with a
    turn logged for each question before it. Returns the turns run."""
    assert integrity(db) == "ok"
    assert stored_messages(db) == imported
    assert rows(db, "SELECT COUNT(*) FROM message_fts") == [(len(imported),)]
    [(meta, turn_count)] = rows(db, "SELECT metadata, turn_count FROM sessions")
    logged = rows(db, "SELECT message_index FROM turn_log ORDER BY turn_index")
    users = [i for i, msg in enumerate(data["messages"]) if msg["role"] == "user"]
    assert turn_count == len(users)  # run turns plus the questions still waiting, as import counted
    mark = json.loads(meta).get("engine_from")
    if mark is None:  # killed after the last turn
        assert [i for (i,) in logged] == users
        return len(users)
    assert data["messages"][mark]["role"] == "user"  # a turn boundary
    assert [i for (i,) in logged] == [i for i in users if i < mark]
    return len(logged)


def wait_for_turns(db: Path, proc: subprocess.Popen[str], at_least: int, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while committed_rows(db, "turn_log") < at_least and time.monotonic() < deadline:
        if proc.poll() is not None:
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_an_interrupted_imported_replay_loses_nothing_and_a_rerun_finishes_it(tmp_path: Path) -> None:
    """Killed (SIGKILL twice, then Ctrl-C) while it runs an imported conversation, the replay
    keeps every message and continues from its mark: the end state is a fresh replay's."""
    home = tmp_path / "home"
    turns = 200
    data = uniform_conversation("imp", turns, topic="imp")
    src = write_json(tmp_path / "imp.json", data, compact=True)
    ref, db = tmp_path / "ref.db", tmp_path / "imported.db"
    run("--db", ref, "-q", "process", src)
    run("--db", db, "-q", "import", src)
    imported = stored_messages(db)
    assert len(imported) == 2 * turns
    ran = []
    for sig, more in ((signal.SIGKILL, 20), (signal.SIGKILL, 40), (signal.SIGINT, 30)):
        proc = start_kvcache("-q", "--db", str(db), "process", str(src), home=home)
        wait_for_turns(db, proc, committed_rows(db, "turn_log") + more)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
        if sig == signal.SIGINT and proc.returncode != 0:
            assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
        ran.append(check_interrupted(db, imported, data))
    assert any(0 < n < turns for n in ran), ran  # the interruptions landed mid-replay
    assert ran == sorted(ran)  # each run went on from where the last one stopped

    again = run_kvcache("-q", "--db", str(db), "process", str(src), "--json", home=home)
    assert again.returncode == 0, again.stderr
    [report] = json.loads(again.stdout)["sessions"]
    assert report["turns_processed"] == turns - ran[-1] and report["messages_added"] == 0
    assert stored_messages(db) == imported
    assert logical_state(db) == logical_state(ref)


def test_a_replay_that_fails_at_a_turn_keeps_the_messages_and_the_rerun_completes(tmp_path: Path) -> None:
    """A turn that fails (here: the store refuses its write) rolls back alone: every
    imported message stays, the mark stays at that turn, and a rerun ends as a fresh replay."""
    fresh, db = tmp_path / "fresh.db", tmp_path / "imported.db"
    processed(fresh, SUPPORT_FILE)
    run("--db", db, "-q", "import", SUPPORT_FILE)
    imported = stored_messages(db)
    conn = sqlite3.connect(db)
    try:  # the 11th turn's log row cannot be written: a real constraint failure in the store
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON turn_log WHEN NEW.turn_index = 11 "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
        conn.commit()
    finally:
        conn.close()
    failed = CliRunner().invoke(app, ["--db", str(db), "-q", "process", str(SUPPORT_FILE)])
    assert failed.exit_code != 0
    data = json.loads(SUPPORT_FILE.read_text(encoding="utf-8"))
    assert check_interrupted(db, imported, data) == 10
    conn = sqlite3.connect(db)
    try:
        conn.execute("DROP TRIGGER refuse")
        conn.commit()
    finally:
        conn.close()
    got = processed(db, SUPPORT_FILE)
    assert got["turns_processed"] == 47 - 10 and got["messages_added"] == 0
    assert stored_messages(db) == imported
    assert state(db) == state(fresh)


def test_a_processed_session_without_questions_is_not_replayed_after_maintain(tmp_path: Path) -> None:
    """A processed session with no user turn whose cache ``maintain`` released looks like
    stored messages only; it is not taken for an old import: nothing is run or stored again."""
    data = {
        "session_id": "notes",
        "messages": [
            {"role": "system", "content": "You keep the team's notes."},
            {"role": "assistant", "content": "Note: the backup window moved to 02:00 UTC."},
        ],
    }
    src = write_json(tmp_path / "notes.json", data)
    db = tmp_path / "kv.db"
    run("--db", db, "-q", "process", src)
    run("--db", db, "-q", "snapshot", "notes")  # a snapshot makes the session one maintain releases
    assert rows(db, "SELECT COUNT(*) FROM cache_entries") == [(2,)]
    run("--db", db, "-q", "maintain", "--inactive-hours", "0")
    assert rows(db, "SELECT COUNT(*) FROM cache_entries") == [(0,)]  # released: cache and snapshots
    assert rows(db, "SELECT COUNT(*) FROM snapshots") == [(0,)]
    before = stored_messages(db)
    got = processed(db, src)
    assert got["messages_added"] == 0 and got["turns_processed"] == 0
    assert not any("import" in n for n in got["notices"])
    assert stored_messages(db) == before  # same row ids: nothing deleted and stored again
    assert rows(db, "SELECT COUNT(*) FROM cache_entries") == [(0,)]


def test_the_replay_runs_the_stored_messages_on_each_backend(
    store_factory: Callable[[str], str],  # noqa: F811
) -> None:
    """On SQLite and PostgreSQL: the replay runs over the imported rows (same ids) and ends
    as a fresh replay does."""
    fresh, db = store_factory("fresh"), store_factory("imported")
    processed(fresh, SUPPORT_FILE)
    run("--db", db, "-q", "import", SUPPORT_FILE)
    ids = table_rows(db, "SELECT id, message_index FROM messages ORDER BY message_index")
    got = processed(db, SUPPORT_FILE)
    assert got["turns_processed"] == 47 and got["messages_added"] == 0
    assert table_rows(db, "SELECT id, message_index FROM messages ORDER BY message_index") == ids
    assert logical_state(db) == logical_state(fresh)
