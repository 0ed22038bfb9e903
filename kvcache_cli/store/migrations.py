"""Ordered, recorded schema migrations, each applied in its own transaction.

``schema_migration`` records every applied version. A migration is a function of the
open ``Store``; it runs inside ``BEGIN IMMEDIATE`` (SQLite) or a transaction
(PostgreSQL), and re-checks that it is still pending once it holds the lock, so two
processes opening a new store at once apply it once. Rule for new migrations: never
edit a released one; append a new version that changes what is there.

Opening a current store only reads the applied versions: the frozen schema and the
search index modules a migration needs are imported by that migration.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import peewee
from peewee import sort_models  # type: ignore[attr-defined]  # public, missing from the stubs

from kvcache_cli.errors import StoreError
from kvcache_cli.store import models as m
from kvcache_cli.store.connection import Store


def utcnow() -> datetime:
    """Naive UTC now (the store's time convention)."""
    return datetime.now(UTC).replace(tzinfo=None)


def create_tables(store: Store, models: list[Any]) -> None:
    """Create ``models``' tables and indexes in ``store`` (dependencies first; existing kept)."""
    for model in sort_models(models):
        peewee.SchemaManager(model, store.db).create_all(safe=True)


def _v1_initial_schema(store: Store) -> None:
    """Tables of the first released schema (frozen in ``schema_v1``) and the statistics row."""
    from kvcache_cli.store import schema_v1

    create_tables(store, schema_v1.ALL_MODELS)
    stats = schema_v1.Statistics
    if not store.bind(stats.select().where(stats._meta.primary_key == 1)).exists():
        store.bind(stats.insert(id=1)).execute()


def _v2_search_index(store: Store) -> None:
    """The full-text index over the message history, filled from existing messages."""
    from kvcache_cli.store.search import create_index

    create_index(store)


MIGRATIONS: list[tuple[int, str, Callable[[Store], None]]] = [
    (1, "initial schema", _v1_initial_schema),
    (2, "full-text search index", _v2_search_index),
]

LATEST_VERSION = MIGRATIONS[-1][0]

#: PostgreSQL advisory lock key serialising migrations (b"kvcache" + "M").
PG_MIGRATION_LOCK = int.from_bytes(b"kvcacheM", "big")


def applied_versions(store: Store) -> set[int]:
    """Versions recorded in the store (empty for a new store)."""
    if not store.db.table_exists(m.SchemaMigration._meta.table_name):
        return set()
    return {row.version for row in store.bind(m.SchemaMigration.select(m.SchemaMigration.version))}


def migrate(store: Store) -> list[int]:
    """Apply every pending migration in order; return the versions applied now."""
    try:
        done = applied_versions(store)
    except peewee.DatabaseError as exc:
        raise StoreError(f"{store.location.display}: cannot read schema ({exc})") from None
    newer = [v for v in done if v > LATEST_VERSION]
    if newer:
        raise StoreError(
            f"{store.location.display}: schema version {max(newer)} is newer than this "
            f"kvcache understands ({LATEST_VERSION}); upgrade kvcache"
        )
    applied: list[int] = []
    for version, name, step in MIGRATIONS:
        if version in done:
            continue

        def work(version: int = version, name: str = name, step: Callable[[Store], None] = step) -> bool:
            if not store.is_sqlite:  # one migrating process at a time (released at commit)
                store.db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (PG_MIGRATION_LOCK,))
            create_tables(store, [m.SchemaMigration])
            if store.bind(m.SchemaMigration.select().where(m.SchemaMigration.version == version)).exists():
                return False
            step(store)
            store.bind(m.SchemaMigration.insert(version=version, name=name, applied_at=utcnow())).execute()
            return True

        if store.transaction(work):
            applied.append(version)
    return applied
