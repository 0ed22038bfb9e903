"""Merging a parallel replay's scratch store into the real one (SQLite only).

A worker replays one conversation into a private scratch store; ``merge_session``
copies that session into the store in one transaction with every id shifted past the
store's current maximum, so the store ends exactly as after a one-by-one replay
(``services/parallel_replay.py`` says when and why).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peewee import ForeignKeyField

from kvcache_cli.errors import StoreError
from kvcache_cli.store import models as m
from kvcache_cli.store.backend import Store


def stored_keys(store: Store, keys: Sequence[str]) -> set[str]:
    """Which of ``keys`` name sessions the store holds already."""
    stored: set[str] = set()
    for start in range(0, len(keys), 500):
        chunk = list(keys[start : start + 500])
        marks = ", ".join("?" * len(chunk))
        stored.update(r[0] for r in store.query(f"SELECT key FROM sessions WHERE key IN ({marks})", chunk))
    return stored


def _shifted_columns(model: type[m.BaseModel]) -> list[tuple[str, str | None]]:
    """(column, table whose id offset it takes or None) for every column of ``model``."""
    out: list[tuple[str, str | None]] = []
    for field in model._meta.sorted_fields:
        if field.primary_key:
            out.append((field.column_name, model._meta.table_name))
        elif isinstance(field, ForeignKeyField):
            out.append((field.column_name, field.rel_model._meta.table_name))
        elif model is m.Session and field.name == "last_snapshot_id":
            out.append((field.column_name, m.Snapshot._meta.table_name))
        else:
            out.append((field.column_name, None))
    return out


#: Tables copied by ``merge_session``, parents first; ``statistics`` is added, not copied.
MERGED: list[type[m.BaseModel]] = [
    model for model in m.ALL_MODELS if model not in (m.SchemaMigration, m.Statistics)
]
_COUNTERS = [
    f.column_name
    for f in m.Statistics._meta.sorted_fields
    if not f.primary_key and f.name != "last_operation"
]


#: ``operations.details`` with the snapshot id of a snapshot/restore record shifted by ``?``.
_SNAPSHOT_DETAILS = (
    "CASE WHEN operation_type IN ('snapshot', 'restore') AND details LIKE 'Snapshot ID: %' "
    "THEN 'Snapshot ID: ' || (CAST(substr(details, 14) AS INTEGER) + ?) ELSE details END"
)


def _offsets(store: Store) -> dict[str, int]:
    """Per table, the id the scratch's id 0 maps to: the store's current maximum."""
    offsets = {
        model._meta.table_name: int(
            store.query(f"SELECT COALESCE(MAX(id), 0) FROM main.{model._meta.table_name}")[0][0]
        )
        for model in MERGED
    }
    made = store.query("SELECT total_snapshots FROM main.statistics WHERE id = 1")
    snapshots = m.Snapshot._meta.table_name
    offsets[snapshots] = max(offsets[snapshots], int(made[0][0] or 0) if made else 0)
    return offsets


def merge_session(store: Store, scratch: str, key: str) -> dict[str, int] | None:
    """Copy the one session of the scratch store ``scratch`` into ``store``, ids shifted.

    One transaction: the session's rows in every table, its full-text index rows, and
    the scratch's statistics added to the store's. Returns the per-table id offsets, or
    None (nothing written) when the store meanwhile holds a session ``key``.
    """
    store.db.execute_sql("ATTACH DATABASE ? AS scratch", (scratch,))
    try:
        return store.transaction(lambda: _merge(store, key))
    finally:
        # a Ctrl-C between BEGIN and peewee's bookkeeping leaves the transaction open
        # (DETACH would then fail and hide the interrupt): roll it back first
        connection = store.db.connection()
        if connection.in_transaction:
            connection.rollback()
        store.db.execute_sql("DETACH DATABASE scratch")


def _merge(store: Store, key: str) -> dict[str, int] | None:
    if store.query("SELECT 1 FROM main.sessions WHERE key = ?", (key,)):
        return None
    scratch_keys = [r[0] for r in store.query("SELECT key FROM scratch.sessions")]
    if scratch_keys != [key]:
        raise StoreError(f"replay worker left sessions {scratch_keys!r}, expected [{key!r}]")
    offsets = _offsets(store)
    first_message = offsets[m.Message._meta.table_name] + 1
    for model in MERGED:
        table = model._meta.table_name
        columns = _shifted_columns(model)
        names = ", ".join(column for column, _ in columns)
        exprs: list[str] = []
        params: list[Any] = []
        for column, shift in columns:
            if model is m.Operation and column == "details":  # "Snapshot ID: 7" records
                exprs.append(_SNAPSHOT_DETAILS)
                params.append(offsets[m.Snapshot._meta.table_name])
            elif shift is None:
                exprs.append(column)
            else:
                exprs.append(f"{column} + ?")
                params.append(offsets[shift])
        store.query(
            f"INSERT INTO main.{table} ({names}) SELECT {', '.join(exprs)} FROM scratch.{table} ORDER BY id",
            params,
        )
    store.query(
        "INSERT INTO main.message_fts(rowid, sess, content) "
        "SELECT id, sess, content FROM main.message_fts_src WHERE id >= ?",
        (first_message,),
    )
    sets = ", ".join(f"{c} = {c} + (SELECT {c} FROM scratch.statistics WHERE id = 1)" for c in _COUNTERS)
    # the scratch's last operation is the store's now, as after a sequential replay
    store.query(
        f"UPDATE main.statistics SET {sets}, last_operation = COALESCE("
        "(SELECT last_operation FROM scratch.statistics WHERE id = 1), last_operation) WHERE id = 1"
    )
    return offsets
