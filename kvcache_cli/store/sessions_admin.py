"""Whole sessions for people: list them, read a conversation back, forget one.

Every statement is raw SQL through ``Store.query`` (``?`` marks, both backends). What a
session owns, and so what ``forget`` deletes, is listed once in ``OWNED``; the full-text
index rows go through ``search.delete_session`` (each backend keeps its own index).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kvcache_cli.store import search
from kvcache_cli.store.models import Message, Session

if TYPE_CHECKING:
    from kvcache_cli.store.backend import Store

_to_time = Session.last_activity.python_value
_to_message_time = Message.timestamp.python_value


@dataclass
class SessionRow:
    """One session as ``kvcache sessions`` lists it."""

    key: str
    messages: int
    turns: int
    clears: int
    snapshots: int
    cache_bytes: int
    capacity_bytes: int
    entries: int
    created_at: datetime | None
    last_activity: datetime | None


def list_rows(store: Store, idle_before: datetime | None = None) -> list[SessionRow]:
    """Every session (most recently active first); with ``idle_before``, only those whose
    last activity is older."""
    where, params = "", []
    if idle_before is not None:
        where, params = "WHERE s.last_activity < ?", [Session.last_activity.db_value(idle_before)]
    rows = store.query(
        "SELECT s.key, COALESCE(mc.n, 0), s.turn_count, s.total_clears, COALESCE(sc.n, 0), "
        "s.cache_size_bytes, s.capacity_bytes, s.entry_count, s.created_at, s.last_activity "
        "FROM sessions s "
        "LEFT JOIN (SELECT session_id, COUNT(*) AS n FROM messages GROUP BY session_id) mc "
        "ON mc.session_id = s.id "
        "LEFT JOIN (SELECT session_id, COUNT(*) AS n FROM snapshots GROUP BY session_id) sc "
        "ON sc.session_id = s.id "
        f"{where} ORDER BY s.last_activity DESC, s.key",
        params,
    )
    return [
        SessionRow(
            key=row[0],
            messages=int(row[1]),
            turns=int(row[2] or 0),
            clears=int(row[3] or 0),
            snapshots=int(row[4]),
            cache_bytes=int(row[5] or 0),
            capacity_bytes=int(row[6] or 0),
            entries=int(row[7] or 0),
            created_at=_to_time(row[8]),
            last_activity=_to_time(row[9]),
        )
        for row in rows
    ]


def session_id(store: Store, key: str) -> int | None:
    """The row id of the session called ``key``."""
    rows = store.query("SELECT id FROM sessions WHERE key = ?", (key,))
    return int(rows[0][0]) if rows else None


def messages(store: Store, sid: int) -> list[tuple[str, str | None, str, datetime | None]]:
    """A session's stored messages in order: ``(role, name, content, timestamp)``."""
    rows = store.query(
        "SELECT role, name, content, timestamp FROM messages WHERE session_id = ? ORDER BY message_index",
        (sid,),
    )
    return [(role, name, content, _to_message_time(ts)) for role, name, content, ts in rows]


# What a session owns, deleted in this order (children before parents): table -> the
# condition that picks the session's rows (``?`` is the session's row id).
OWNED: dict[str, str] = {
    "embeddings": "message_id IN (SELECT id FROM messages WHERE session_id = ?)",
    "snapshot_entries": "snapshot_id IN (SELECT id FROM snapshots WHERE session_id = ?)",
    "snapshots": "session_id = ?",
    "cache_entries": "session_id = ?",
    "engagement": "session_id = ?",
    "turn_log": "session_id = ?",
    "summaries": "session_id = ?",
    "messages": "session_id = ?",
}


def footprint(store: Store, sid: int, key: str) -> dict[str, int]:
    """Rows of each kind the session owns (``operations``: its history records)."""
    counts = {
        table: int(store.query(f"SELECT COUNT(*) FROM {table} WHERE {condition}", (sid,))[0][0])
        for table, condition in OWNED.items()
    }
    counts["operations"] = int(
        store.query("SELECT COUNT(*) FROM operations WHERE session_key = ?", (key,))[0][0]
    )
    return counts


WAITING_KEY = "slot_files_to_delete"
"""Session metadata key: slot files of deleted snapshots not deleted yet (no slot folder known)."""


def snapshot_slot_files(store: Store, sid: int) -> dict[int, str]:
    """``{snapshot id: slot file}`` of the session's snapshots that name one."""
    rows = store.query(
        "SELECT id, slot_filename FROM snapshots "
        "WHERE session_id = ? AND slot_filename IS NOT NULL AND slot_filename <> ''",
        (sid,),
    )
    return {int(snap_id): str(name) for snap_id, name in rows}


def snapshot_slot_files_of(store: Store, session_ids: list[int]) -> dict[int, set[str]]:
    """``{session id: slot files}`` of the sessions' snapshots that name one (one query
    per 500 sessions: ``maintain`` asks for every idle session)."""
    out: dict[int, set[str]] = {}
    for lo in range(0, len(session_ids), 500):
        part = session_ids[lo : lo + 500]
        rows = store.query(
            "SELECT session_id, slot_filename FROM snapshots WHERE session_id IN "
            f"({', '.join('?' * len(part))}) AND slot_filename IS NOT NULL AND slot_filename <> ''",
            part,
        )
        for sid, name in rows:
            out.setdefault(int(sid), set()).add(str(name))
    return out


def metadata_of(store: Store, sid: int) -> dict[str, Any]:
    """The session's metadata object ({} when absent or not an object)."""
    rows = store.query("SELECT metadata FROM sessions WHERE id = ?", (sid,))
    try:
        meta = json.loads(rows[0][0] or "{}") if rows else {}
    except ValueError:
        meta = {}
    return meta if isinstance(meta, dict) else {}


def waiting_slot_files(store: Store) -> dict[int, list[str]]:
    """``{session id: slot files}`` waiting to be deleted, recorded by ``add_waiting``."""
    rows = store.query("SELECT id FROM sessions WHERE metadata LIKE ?", (f"%{WAITING_KEY}%",))
    out: dict[int, list[str]] = {}
    for (sid,) in rows:
        names = metadata_of(store, int(sid)).get(WAITING_KEY)
        if isinstance(names, list) and names:
            out[int(sid)] = [str(n) for n in names]
    return out


def set_metadata_names(store: Store, sid: int, key: str, names: list[str]) -> None:
    """Record a sorted list of names under ``key`` of the session's metadata (an empty
    list removes the key)."""
    meta = metadata_of(store, sid)
    if names:
        meta[key] = sorted(set(names))
    else:
        meta.pop(key, None)
    store.query("UPDATE sessions SET metadata = ? WHERE id = ?", (json.dumps(meta, sort_keys=True), sid))


def set_waiting_slot_files(store: Store, sid: int, names: list[str]) -> None:
    """Record the session's waiting slot files (an empty list removes the record)."""
    set_metadata_names(store, sid, WAITING_KEY, names)


def slot_files(store: Store, sid: int) -> list[str]:
    """The llama-server slot files the session's snapshots name, and those still waiting."""
    names = set(snapshot_slot_files(store, sid).values())
    names.update(waiting_slot_files_of(store, sid))
    return sorted(names)


def waiting_slot_files_of(store: Store, sid: int) -> list[str]:
    names = metadata_of(store, sid).get(WAITING_KEY)
    return [str(n) for n in names] if isinstance(names, list) else []


def delete(store: Store, sid: int, key: str) -> None:
    """Delete everything of the session; call inside a transaction (the caller's unit)."""
    search.delete_session(store, sid)  # the index first: it reads the rows it drops
    for table, condition in OWNED.items():
        store.query(f"DELETE FROM {table} WHERE {condition}", (sid,))
    store.query("DELETE FROM operations WHERE session_key = ?", (key,))
    store.query("DELETE FROM sessions WHERE id = ?", (sid,))


# ----------------------------------------------------------------------------- imported history
ENGINE_FROM_KEY = "engine_from"
"""Session metadata key: the index of the first stored message the engine has not run
(messages ``import`` stored); absent when the engine has run every stored message."""


def engine_from(store: Store, sid: int) -> int | None:
    """The session's ``engine_from`` mark, if any."""
    return mark_in(metadata_of(store, sid))


def mark_in(meta: Any) -> int | None:
    """The ``engine_from`` mark of a session's decoded metadata, if any."""
    value = meta.get(ENGINE_FROM_KEY) if isinstance(meta, dict) else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def mark_engine_from(store: Store, sid: int, index: int) -> None:
    """Record that messages from ``index`` on were stored without the engine (keeps an earlier mark)."""
    meta = metadata_of(store, sid)
    current = mark_in(meta)
    if current is not None and current <= index:
        return
    meta[ENGINE_FROM_KEY] = int(index)
    store.query("UPDATE sessions SET metadata = ? WHERE id = ?", (json.dumps(meta, sort_keys=True), sid))


def mark_if_imported_unmarked(store: Store, sid: int) -> bool:
    """Mark (from message 0) a session that an ``import`` older than the mark stored and the
    engine never touched; True when marked (call inside a transaction).

    Such a session is told by what only that import left: a sessions row with no capacity
    (``process`` and ``serve`` record the capacity when they create a session, and
    ``maintain`` keeps it when it releases a cache), no turn counted by the engine (no
    conversation count, no clear) and no turn log, cache entry, snapshot or summary. A
    processed session whose cache ``maintain`` released keeps its capacity, so it is never
    taken for one, even without any user turn.
    """
    rows = store.query(
        "SELECT capacity_bytes, conversation_count, total_clears, metadata FROM sessions WHERE id = ?",
        (sid,),
    )
    if not rows or any(int(v or 0) for v in rows[0][:3]) or engine_from(store, sid) is not None:
        return False
    if any(
        store.query(f"SELECT 1 FROM {table} WHERE session_id = ? LIMIT 1", (sid,))
        for table in ("turn_log", "cache_entries", "snapshots", "summaries")
    ):
        return False
    if not store.query("SELECT 1 FROM messages WHERE session_id = ? LIMIT 1", (sid,)):
        return False
    mark_engine_from(store, sid, 0)
    return True


def engine_turns(store: Store, sid: int) -> int:
    """The number of the last turn the engine ran on the session (its turn log's), or 0."""
    rows = store.query("SELECT MAX(turn_index) FROM turn_log WHERE session_id = ?", (sid,))
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0
