"""Copying every row of one store into another, and the per-table digests that verify it.

Values are read and written through the unbound models with each query bound to its
store; a digest canonicalises values (floats, times, blobs) so that SQLite and
PostgreSQL rows of the same data hash the same.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from datetime import date, datetime
from typing import Any

import peewee

from kvcache_cli.store import models as m
from kvcache_cli.store import search_postgres
from kvcache_cli.store.connection import Store
from kvcache_cli.store.search import create_index

#: Tables copied and verified, in dependency order (``schema_migrations`` is each
#: store's own: both sides are migrated to the latest version when opened).
COPIED: list[type[m.BaseModel]] = [model for model in m.ALL_MODELS if model is not m.SchemaMigration]
BATCH = 500


# ------------------------------------------------------------------------ hashing
def _canonical(value: Any) -> Any:
    """A value in a form that is the same whichever backend it was read from."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, datetime):
        return value.replace(tzinfo=None).isoformat(sep=" ")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "x:" + bytes(value).hex()
    return str(value)


def _primary_key(model: type[m.BaseModel]) -> Any:
    return model._meta.primary_key


def _batches(db: peewee.Database, model: type[m.BaseModel]) -> Iterator[list[tuple[Any, ...]]]:
    """All rows of ``model`` from ``db``, in primary-key order, a batch at a time."""
    fields = model._meta.sorted_fields
    pk = _primary_key(model)
    last: Any = None
    while True:
        query = model.select(*fields).order_by(pk).limit(BATCH)
        if last is not None:
            query = query.where(pk > last)
        rows: list[tuple[Any, ...]] = list(query.tuples().bind(db))  # type: ignore[arg-type]
        if not rows:
            return
        yield rows
        last = rows[-1][fields.index(pk)]


def table_digest(db: peewee.Database, model: type[m.BaseModel]) -> tuple[int, str]:
    """``(rows, sha256)`` of a table: every row in id order, values canonicalised."""
    digest = hashlib.sha256()
    count = 0
    for rows in _batches(db, model):
        for row in rows:
            digest.update(json.dumps([_canonical(v) for v in row], ensure_ascii=False).encode())
            digest.update(b"\n")
            count += 1
    return count, digest.hexdigest()


# ------------------------------------------------------------------------ copying
def is_empty(store: Store) -> bool:
    """Whether ``store`` holds nothing but a fresh statistics row."""
    for model in COPIED:
        if model is m.Statistics:
            if store.bind(model.select()).count() > 1:
                return False
            row = store.bind(model.select().where(model._meta.primary_key == 1)).get_or_none()
            if row is not None and (
                row.last_operation is not None or row.total_clears or row.total_retrievals
            ):
                return False
        elif store.bind(model.select()).exists():
            return False
    return True


def _reset_sequences(store: Store) -> None:
    for model in COPIED:
        pk = _primary_key(model)
        if not isinstance(pk, peewee.AutoField):
            continue
        table = model._meta.table_name
        store.db.execute_sql(
            f"SELECT setval(pg_get_serial_sequence('\"{table}\"', '{pk.column_name}'), "
            f'coalesce(max("{pk.column_name}"), 1), max("{pk.column_name}") IS NOT NULL) FROM "{table}"'
        )


def copy_into(source: Store, dest: Store) -> None:
    """Replace ``dest``'s rows by ``source``'s (inside the caller's transaction)."""
    for model in reversed(COPIED):
        dest.bind(model.delete()).execute()
    if not dest.is_sqlite:
        dest.db.execute_sql(f"DELETE FROM {search_postgres.TABLE}")
    for model in COPIED:
        fields = model._meta.sorted_fields
        for rows in _batches(source.db, model):
            dest.bind(model.insert_many(rows, fields=fields)).execute()
    if not dest.is_sqlite:
        _reset_sequences(dest)
    create_index(dest)
