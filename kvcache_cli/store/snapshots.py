"""Snapshots (tier 2) and their entries: every SQL statement on them."""

from __future__ import annotations

from typing import Any

from kvcache_cli.engine.entries import KVEntry
from kvcache_cli.store import counters
from kvcache_cli.store import models as m
from kvcache_cli.store.bulk import bulk_insert
from kvcache_cli.store.cache import ENTRY_COLUMNS, entries_from_rows, entry_row
from kvcache_cli.store.connection import Store


def next_id(store: Store) -> int:
    """A snapshot id never issued before, even after the newest snapshots were deleted.

    SQLite reuses ``max(id) + 1`` once the top rows are gone, which would let an old
    ``restore`` id or an operation record ("Snapshot ID: 7") point at a different
    snapshot. Every snapshot ever made is counted in ``statistics.total_snapshots``
    (bumped after each insert), so ``max(max id, that count) + 1`` is always new.
    Called inside the write transaction that inserts the row; on PostgreSQL the
    statistics row is locked first, so concurrent writers take turns.
    """
    made = counters.snapshots_made(store)
    top = store.query("SELECT max(id) FROM snapshots")[0][0] or 0
    return int(max(top, made)) + 1


def insert(store: Store, values: dict[str, Any], entries: list[KVEntry]) -> m.Snapshot:
    """Insert a snapshot row (``values`` by field name, with its ``id``) and its entries."""
    bulk_insert(store, m.Snapshot, [values])
    row = m.Snapshot(**values)
    rows = []
    for position, entry in enumerate(entries):
        data = entry_row(entry, position)
        data["snapshot"] = row.id
        rows.append(data)
    bulk_insert(store, m.SnapshotEntry, rows)
    return row


def set_slot(
    store: Store, snapshot_id: int, slot_id: Any, filename: Any, n_saved: Any, n_written: Any
) -> None:
    """Record the server slot file saved with a snapshot."""
    store.query(
        "UPDATE snapshots SET slot_id = ?, slot_filename = ?, slot_n_saved = ?, slot_n_written = ? "
        "WHERE id = ?",
        (slot_id, filename, n_saved, n_written, int(snapshot_id)),
    )


def last_hash(store: Store, session_id: int) -> str | None:
    """State hash of the session's newest snapshot."""
    rows = store.query(
        "SELECT state_hash FROM snapshots WHERE session_id = ? ORDER BY created_at DESC, id DESC LIMIT 1",
        (int(session_id),),
    )
    return str(rows[0][0]) if rows else None


def recent(store: Store, session_id: int, count: int) -> list[tuple[int, str]]:
    """``(id, state hash)`` of the session's newest ``count`` snapshots, newest first."""
    return store.query(
        "SELECT id, state_hash FROM snapshots WHERE session_id = ? ORDER BY created_at DESC, id DESC LIMIT ?",
        (int(session_id), int(count)),
    )


def prune(store: Store, session_id: int, keep: int, dry_run: bool) -> list[int]:
    """Drop all but the newest ``keep`` snapshots; ties broken by id (newest wins)."""
    tail = "LIMIT -1 OFFSET ?" if store.is_sqlite else "OFFSET ?"
    rows = store.query(
        f"SELECT id FROM snapshots WHERE session_id = ? ORDER BY created_at DESC, id DESC {tail}",
        (int(session_id), int(keep)),
    )
    ids = [r[0] for r in rows]
    if ids and not dry_run:
        marks = ", ".join("?" * len(ids))
        store.query(f"DELETE FROM snapshot_entries WHERE snapshot_id IN ({marks})", ids)
        store.query(f"DELETE FROM snapshots WHERE id IN ({marks})", ids)
    return ids


def entries(store: Store, snapshot_id: int) -> list[KVEntry]:
    """A snapshot's entries in position order."""
    rows = store.query(
        f"SELECT {ENTRY_COLUMNS} FROM snapshot_entries WHERE snapshot_id = ? ORDER BY position, id",
        (int(snapshot_id),),
    )
    return entries_from_rows(rows)


def get(store: Store, session_id: int, snapshot_id: int) -> m.Snapshot | None:
    """The session's snapshot ``snapshot_id``."""
    query = m.Snapshot.select().where((m.Snapshot.id == snapshot_id) & (m.Snapshot.session == session_id))
    row: m.Snapshot | None = store.bind(query).get_or_none()
    return row


def listed(store: Store, session_id: int | None) -> list[tuple[m.Snapshot, str]]:
    """``(snapshot, session key)`` of one session's (or every) snapshot, by key and age."""
    query = m.Snapshot.select(m.Snapshot, m.Session.key).join(m.Session)
    if session_id is not None:
        query = query.where(m.Snapshot.session == session_id)
    query = query.order_by(m.Session.key, m.Snapshot.created_at, m.Snapshot.id)
    return [(row, row.session.key) for row in store.bind(query)]
