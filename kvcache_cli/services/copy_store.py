"""Copy a whole store between backends (SQLite <-> PostgreSQL), verified.

Every model table is copied in dependency order with its ids, in one destination
transaction (a failure leaves the destination as it was); PostgreSQL sequences are
moved past the copied ids; the full-text index is rebuilt on the destination. Then
both sides are read back: per table, the row count and a SHA-256 over the rows in id
order, each value in a backend-neutral form. Any difference is an error.

Stop the writers of the source while copying: rows written meanwhile may be missed
(the verification then fails).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import peewee

from kvcache_cli.errors import BadInputError, IntegrityError
from kvcache_cli.store import models as m
from kvcache_cli.store.backend import Store, open_store, parse_location
from kvcache_cli.store.search import create_index

#: Tables copied and verified, in dependency order (``schema_migrations`` is each
#: store's own: both sides are migrated to the latest version when opened).
COPIED: list[type[m.BaseModel]] = [model for model in m.ALL_MODELS if model is not m.SchemaMigration]
BATCH = 500


@dataclass
class TableCopy:
    """One table's result: rows and content hashes on both sides."""

    table: str
    source_rows: int
    dest_rows: int
    source_sha256: str
    dest_sha256: str

    @property
    def match(self) -> bool:
        return self.source_rows == self.dest_rows and self.source_sha256 == self.dest_sha256

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "rows": self.dest_rows,
            "source_rows": self.source_rows,
            "sha256": self.dest_sha256,
            "source_sha256": self.source_sha256,
            "match": self.match,
        }


@dataclass
class CopyResult:
    """What ``copy-store`` did, for the table and ``--json``."""

    source: str
    destination: str
    source_backend: str
    dest_backend: str
    tables: list[TableCopy] = field(default_factory=list)
    dry_run: bool = False

    @property
    def verified(self) -> bool:
        return all(t.match for t in self.tables)

    @property
    def total_rows(self) -> int:
        return sum(t.dest_rows for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "source_backend": self.source_backend,
            "dest_backend": self.dest_backend,
            "total_rows": self.total_rows,
            "verified": self.verified,
            "tables": [t.to_dict() for t in self.tables],
        }


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


def _copy_into(source: Store, dest: Store) -> None:
    """Replace ``dest``'s rows by ``source``'s (inside the caller's transaction)."""
    for model in reversed(COPIED):
        dest.bind(model.delete()).execute()
    if not dest.is_sqlite:
        from kvcache_cli.store import search_postgres

        dest.db.execute_sql(f"DELETE FROM {search_postgres.TABLE}")
    for model in COPIED:
        fields = model._meta.sorted_fields
        for rows in _batches(source.db, model):
            dest.bind(model.insert_many(rows, fields=fields)).execute()
    if not dest.is_sqlite:
        _reset_sequences(dest)
    create_index(dest)


def copy_store(source_url: str, dest_url: str, force: bool = False) -> CopyResult:
    """Copy every row of the store at ``source_url`` into ``dest_url`` and verify it.

    The destination is created and migrated if needed; one that already holds data is
    refused unless ``force`` (then its rows are replaced). Raises ``IntegrityError``
    when the verification finds a difference.
    """
    src_loc = parse_location(source_url)
    dst_loc = parse_location(dest_url)
    if (src_loc.backend, src_loc.target) == (dst_loc.backend, dst_loc.target):
        raise BadInputError("source and destination are the same store")
    source = open_store(source_url, must_exist=True)
    try:
        dest = open_store(dest_url)
        try:
            result = CopyResult(
                source=src_loc.display,
                destination=dst_loc.display,
                source_backend=src_loc.backend,
                dest_backend=dst_loc.backend,
            )
            if not force and not is_empty(dest):
                raise BadInputError(
                    f"{dst_loc.display}: destination store is not empty (use --force to replace it)"
                )
            dest.transaction(lambda: _copy_into(source, dest))
            for model in COPIED:
                src_rows, src_hash = table_digest(source.db, model)
                dst_rows, dst_hash = table_digest(dest.db, model)
                result.tables.append(
                    TableCopy(model._meta.table_name, src_rows, dst_rows, src_hash, dst_hash)
                )
            bad = [t.table for t in result.tables if not t.match]
            if bad:
                raise IntegrityError(
                    f"copy verification failed for {', '.join(bad)} (was the source written meanwhile?)"
                )
            return result
        finally:
            dest.close()
    finally:
        source.close()
