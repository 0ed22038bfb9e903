"""The store's global counters (``statistics``) and its operation history (``operations``)."""

from __future__ import annotations

from datetime import datetime

from kvcache_cli.store import models as m
from kvcache_cli.store.connection import Store


def bump(store: Store, now: datetime, **deltas: int) -> None:
    """Add ``deltas`` to the named counters and set ``last_operation`` (in a transaction)."""
    for name in deltas:
        if name not in m.Statistics._meta.fields or name in ("id", "last_operation"):
            raise ValueError(f"no statistics counter {name!r}")
    sets = ", ".join(f"{name} = {name} + ?" for name in deltas)
    store.query(
        f"UPDATE statistics SET {sets}{', ' if sets else ''}last_operation = ? WHERE id = 1",
        (*(int(v) for v in deltas.values()), m.Statistics.last_operation.db_value(now)),
    )


def record(store: Store, session_key: str, kind: str, affected: int, details: str, now: datetime) -> None:
    """Append one operation to the history (raw SQL: several times per replayed turn)."""
    store.query(
        "INSERT INTO operations (session_key, operation_type, timestamp, entries_affected, details) "
        "VALUES (?, ?, ?, ?, ?)",
        (session_key, kind, m.Operation.timestamp.db_value(now), int(affected), details),
    )


def snapshots_made(store: Store) -> int:
    """Snapshots ever made (``total_snapshots``); locks the counters row on PostgreSQL."""
    lock = "" if store.is_sqlite else " FOR UPDATE"  # PostgreSQL: one writer at a time
    return int(store.query(f"SELECT total_snapshots FROM statistics WHERE id = 1{lock}")[0][0] or 0)
