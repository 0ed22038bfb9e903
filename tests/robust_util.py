"""Shared helpers of the robustness tests (issue 5): run the real CLI, build files, read a store.

Everything works on real SQLite files (or a PostgreSQL database, for the helpers that
take a URL) and the installed ``kvcache`` in subprocesses with ``KVCACHE_HOME``
pointing into the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.pg import is_pg

KVCACHE = shutil.which("kvcache", path=str(Path(sys.executable).parent)) or str(
    Path(sys.executable).parent / "kvcache"
)
BASE_TS = 1_700_000_000


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """A subprocess environment whose kvcache files all live under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
    env["KVCACHE_HOME"] = str(home)
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def run_cli(home: Path, *args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``kvcache ARGS`` to completion and capture its output."""
    return subprocess.run(
        [KVCACHE, *args], env=cli_env(home, **extra), capture_output=True, text=True, timeout=timeout
    )


def start_cli(home: Path, *args: str, **extra: str) -> subprocess.Popen[str]:
    """Start ``kvcache ARGS`` without waiting."""
    return subprocess.Popen(
        [KVCACHE, *args],
        env=cli_env(home, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def conversation(session: str, turns: int, topic: str = "cache", seed: int = 0) -> dict[str, Any]:
    """A native conversation with timestamps (so a replay is deterministic).

    Every message has exactly 12 words: tier-3 ranking normalises by the index's
    average message length over *all* sessions, so equal lengths keep one session's
    retrieval independent of what other sessions hold at the time (any interleaving of
    concurrent writers then gives the same numbers as a sequential run).
    """
    msgs: list[dict[str, Any]] = []
    for i in range(turns):
        t = BASE_TS + seed * 100_000 + i * 60
        question = f"how do i configure the {topic} option {i} for the {topic}{i % 7} setting?"
        if i % 5 == 0:
            question = f"remember the {topic} size {i} mb is important for the whole team"
        msgs.append({"role": "user", "content": question, "timestamp": t})
        msgs.append(
            {
                "role": "assistant",
                "content": f"set {topic}{i % 7} to {i * 3} and restart so the {topic} keeps {i} entries",
                "timestamp": t + 30,
            }
        )
    return {"session_id": session, "messages": msgs}


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def connect(db: Path) -> sqlite3.Connection:
    """A plain read connection to a store file (no kvcache code involved)."""
    conn = sqlite3.connect(str(db), timeout=30)
    return conn


SESSION_COLUMNS = (
    "key, conversation_count, turn_count, last_cleared_at, cache_size_bytes, capacity_bytes, "
    "entry_count, total_clears, metadata"
)


def _reader(db: Path | str) -> tuple[Callable[..., Any], Callable[[], None]]:
    """A ``q(sql, params) -> cursor-like`` for a SQLite file or a PostgreSQL URL, and a closer."""
    if is_pg(db):
        import psycopg2

        pg = psycopg2.connect(str(db))
        cur = pg.cursor()

        def q(sql: str, params: tuple[Any, ...] = ()) -> Any:
            sql = sql.replace("?", "%s").replace("round(g.score, 9)", "round(g.score::numeric, 9)")
            cur.execute(sql, params or None)
            return cur

        return q, pg.close
    conn = connect(Path(db))
    return conn.execute, conn.close


def logical_state(db: Path | str) -> dict[str, Any]:
    """Everything a replay decides, without wall-clock columns or row ids that may differ."""
    q, close = _reader(db)
    try:
        state: dict[str, Any] = {}
        state["sessions"] = q(f"SELECT {SESSION_COLUMNS} FROM sessions ORDER BY key").fetchall()
        state["messages"] = q(
            "SELECT s.key, m.message_index, m.role, m.name, m.content, m.tokens, m.timestamp "
            "FROM messages m JOIN sessions s ON s.id = m.session_id ORDER BY s.key, m.message_index"
        ).fetchall()
        state["cache"] = q(
            "SELECT s.key, c.key_hash, c.key_type, c.importance, c.access_count, c.size_bytes, c.tokens, "
            "c.message_index, c.position FROM cache_entries c JOIN sessions s ON s.id = c.session_id "
            "ORDER BY s.key, c.position, c.key_hash"
        ).fetchall()
        state["snapshots"] = q(
            "SELECT s.key, p.turn_index, p.snapshot_type, p.reason, p.state_hash, p.entry_count, p.size_bytes "  # noqa: E501
            "FROM snapshots p JOIN sessions s ON s.id = p.session_id ORDER BY s.key, p.turn_index, p.state_hash"  # noqa: E501
        ).fetchall()
        state["snapshot_entries"] = q(
            "SELECT p.state_hash, e.key_hash, e.position FROM snapshot_entries e "
            "JOIN snapshots p ON p.id = e.snapshot_id ORDER BY p.state_hash, e.position"
        ).fetchall()
        state["summaries"] = q(
            "SELECT s.key, u.text, u.messages_summarized, u.clear_count FROM summaries u "
            "JOIN sessions s ON s.id = u.session_id ORDER BY s.key"
        ).fetchall()
        state["turn_log"] = q(
            "SELECT s.key, t.turn_index, t.message_index, t.cache_size_bytes, t.entry_count, t.cleared, "
            "t.clear_reason, t.retrieved FROM turn_log t JOIN sessions s ON s.id = t.session_id "
            "ORDER BY s.key, t.turn_index"
        ).fetchall()
        state["engagement"] = q(
            "SELECT s.key, g.key_hash, round(g.score, 9) FROM engagement g JOIN sessions s ON s.id = g.session_id "  # noqa: E501
            "ORDER BY s.key, g.key_hash"
        ).fetchall()
        state["statistics"] = q(
            "SELECT total_clears, total_retrievals, total_snapshots, total_restores, entries_preserved, "
            "entries_cleared, entries_retrieved FROM statistics"
        ).fetchall()
        state["operations"] = q(
            "SELECT session_key, operation_type, entries_affected, count(*) FROM operations "
            "GROUP BY session_key, operation_type, entries_affected ORDER BY 1, 2, 3"
        ).fetchall()
        state["fts_rows"] = q("SELECT count(*) FROM messages").fetchone()
        return {k: [tuple(r) for r in v] if isinstance(v, list) else tuple(v) for k, v in state.items()}
    finally:
        close()


def committed_rows(db: Path, table: str) -> int:
    """Rows of ``table`` committed so far, read-only (0 while the store is being created)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def integrity(db: Path) -> str:
    conn = connect(db)
    try:
        return "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check").fetchall())
    finally:
        conn.close()


def check_turn_boundaries(db: Path | str, conversations: dict[str, dict[str, Any]]) -> None:
    """Assert that every session holds whole turns only and its records agree.

    ``conversations`` maps session key to the file's data. Stored messages must be a
    prefix of the file that ends at a turn boundary (the message before a user message
    or the end), and the turn count must equal the turn-log rows and user messages.
    """
    q, close = _reader(db)
    try:
        for key, data in conversations.items():
            row = q("SELECT id, turn_count FROM sessions WHERE key = ?", (key,)).fetchone()
            if row is None:
                continue
            sid, turn_count = row
            stored = q(
                "SELECT message_index, role, content FROM messages WHERE session_id = ? ORDER BY message_index",  # noqa: E501
                (sid,),
            ).fetchall()
            msgs = data["messages"]
            assert [r[0] for r in stored] == list(range(len(stored))), key
            for index, role, content in stored:
                assert (role, content) == (msgs[index]["role"], msgs[index]["content"]), (key, index)
            n = len(stored)
            assert n == len(msgs) or msgs[n]["role"] == "user", f"{key}: half a turn stored ({n} messages)"
            users = sum(1 for r in stored if r[1] == "user")
            logs = q("SELECT count(*) FROM turn_log WHERE session_id = ?", (sid,)).fetchone()[0]
            assert turn_count == users == logs, (key, turn_count, users, logs)
    finally:
        close()
