"""The read queries behind ``stats`` and the maintenance sweep (``maintain``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from peewee import fn

from kvcache_cli.store import models as m
from kvcache_cli.store.connection import Store


def _has_snapshot() -> Any:
    return fn.EXISTS(m.Snapshot.select(m.Snapshot.id).where(m.Snapshot.session == m.Session.id))


def counters(store: Store) -> m.Statistics:
    """The one row of global counters."""
    row: m.Statistics = store.bind(m.Statistics.select().where(m.Statistics.id == 1)).get()
    return row


def count(store: Store, model: Any) -> int:
    """Rows in ``model``'s table."""
    return int(store.bind(model.select()).count())


def table_counts(store: Store) -> dict[str, int]:
    """Rows of sessions, snapshots, messages and operations, and the active sessions
    (still holding cache entries or a snapshot), in one statement: ``stats`` start-up
    pays for one query, not five."""
    (row,) = store.query(
        "SELECT (SELECT COUNT(*) FROM sessions), (SELECT COUNT(*) FROM snapshots),"
        " (SELECT COUNT(*) FROM messages), (SELECT COUNT(*) FROM operations),"
        " (SELECT COUNT(*) FROM sessions AS s WHERE s.entry_count > 0"
        " OR EXISTS (SELECT 1 FROM snapshots AS p WHERE p.session_id = s.id))"
    )
    names = ("sessions", "snapshots", "messages", "operations", "active_sessions")
    return {name: int(value) for name, value in zip(names, row, strict=True)}


def session_rows(store: Store, session_id: int | None = None) -> list[Any]:
    """Session rows as named tuples (thousands of sessions: no model instances), by key."""
    query = m.Session.select().order_by(m.Session.key)
    if session_id is not None:
        query = query.where(m.Session.id == session_id)
    return list(store.bind(query).namedtuples())


def recent_operations(store: Store, limit: int, session_key: str | None = None) -> list[Any]:
    """The newest ``limit`` operations (of one session), newest first."""
    query = m.Operation.select().order_by(m.Operation.id.desc()).limit(max(limit, 0))
    if session_key is not None:
        query = query.where(m.Operation.session_key == session_key)
    return list(store.bind(query))


def message_count(store: Store, session_id: int) -> int:
    return int(store.bind(m.Message.select().where(m.Message.session == session_id)).count())


def summary_row(store: Store, session_id: int) -> m.Summary | None:
    row: m.Summary | None = store.bind(
        m.Summary.select().where(m.Summary.session == session_id)
    ).get_or_none()
    return row


def usage(store: Store, session_id: int) -> list[tuple[Any, ...]]:
    """``(turn, cache bytes, cleared, clear reason)`` of every logged turn, in order."""
    t = m.TurnLog
    query = (
        t.select(t.turn_index, t.cache_size_bytes, t.cleared, t.clear_reason)
        .where(t.session == session_id)
        .order_by(t.turn_index)
        .tuples()
    )
    return m.rows_of(store.bind(query))


def session_fill_rows(store: Store) -> list[tuple[Any, ...]]:
    """``(key, cache bytes, capacity, clears, entries, last activity)`` of every session."""
    s = m.Session
    query = s.select(
        s.key, s.cache_size_bytes, s.capacity_bytes, s.total_clears, s.entry_count, s.last_activity
    ).tuples()
    return m.rows_of(store.bind(query))


def operations_by_hour(store: Store, start: datetime, end: datetime) -> list[tuple[Any, ...]]:
    """``(operation type, "YYYY-MM-DD HH", count)`` of the operations in [start, end)."""
    op = m.Operation
    if store.is_sqlite:
        bucket = fn.substr(op.timestamp, 1, 13)
    else:
        bucket = fn.to_char(op.timestamp, "YYYY-MM-DD HH24")
    query = (
        op.select(op.operation_type, bucket.alias("hour"), fn.COUNT(op.id))
        .where((op.timestamp >= start) & (op.timestamp < end))
        .group_by(op.operation_type, bucket)
        .tuples()
    )
    return m.rows_of(store.bind(query))


# ----------------------------------------------------------------------------- maintenance
def idle_sessions(store: Store, cutoff: datetime) -> list[tuple[int, str]]:
    """``(id, key)`` of sessions inactive since ``cutoff`` that still hold a cache or snapshot."""
    query = (
        m.Session.select(m.Session.id, m.Session.key)
        .where((m.Session.last_activity < cutoff) & ((m.Session.entry_count > 0) | _has_snapshot()))
        .order_by(m.Session.key)
        .tuples()
    )
    return [(int(sid), str(key)) for sid, key in m.rows_of(store.bind(query))]


def release_sessions(store: Store, session_ids: list[int]) -> None:
    """Drop the sessions' snapshots and caches (their history stays), 500 per statement."""
    for lo in range(0, len(session_ids), 500):
        part = session_ids[lo : lo + 500]
        marks = ", ".join("?" * len(part))
        for statement in (
            "DELETE FROM snapshot_entries WHERE snapshot_id IN "
            f"(SELECT id FROM snapshots WHERE session_id IN ({marks}))",
            f"DELETE FROM snapshots WHERE session_id IN ({marks})",
            f"DELETE FROM cache_entries WHERE session_id IN ({marks})",
            "UPDATE sessions SET entry_count = 0, cache_size_bytes = 0, "
            f"last_snapshot_id = NULL WHERE id IN ({marks})",
        ):
            store.query(statement, part)


def crowded_sessions(store: Store, keep: int) -> list[tuple[int, str]]:
    """``(id, key)`` of sessions with more than ``keep`` snapshots."""
    query = (
        m.Snapshot.select(m.Snapshot.session, m.Session.key)
        .join(m.Session)
        .group_by(m.Snapshot.session, m.Session.key)
        .having(fn.COUNT(m.Snapshot.id) > keep)
        .tuples()
    )
    return [(int(sid), str(key)) for sid, key in m.rows_of(store.bind(query))]


def trim_operations(store: Store, keep: int) -> None:
    """Delete all but the newest ``keep`` operations (slot files still waiting stay listed)."""
    from kvcache_cli.store.slot_records import WAITING_OPERATION  # maintenance only, not the reports

    op = m.Operation
    boundary = store.bind(op.select(op.id).order_by(op.id.desc()).offset(keep - 1).limit(1)).scalar()
    store.bind(op.delete().where((op.id < boundary) & (op.operation_type != WAITING_OPERATION))).execute()


def integrity_check(store: Store) -> str:
    """``PRAGMA integrity_check`` (SQLite) or ``ok`` when PostgreSQL answers."""
    if store.is_sqlite:
        return "; ".join(str(r[0]) for r in store.query("PRAGMA integrity_check"))
    store.query("SELECT 1")
    return "ok"
