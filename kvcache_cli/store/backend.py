"""Opening a store: the one entry point (``open_store``) and the store's public names.

``location`` parses the address, ``connection`` holds the open ``Store`` (SQLite here,
``postgres`` for PostgreSQL), ``migrations`` brings the schema up to date.
"""

from __future__ import annotations

import os
from typing import Any

from kvcache_cli.store.connection import Store, is_locked_error, open_sqlite
from kvcache_cli.store.location import StoreLocation, parse_location, redact_url
from kvcache_cli.store.migrations import migrate

__all__ = [
    "Store",
    "StoreLocation",
    "is_locked_error",
    "open_sqlite",
    "open_store",
    "parse_location",
    "redact_url",
]


def open_store(
    url: str | os.PathLike[str] | None = None,
    busy_timeout_ms: int = 30000,
    must_exist: bool = False,
    autocheckpoint: bool = True,
) -> Store:
    """Open (creating and migrating if needed) the store at ``url``.

    ``must_exist``: a SQLite file that is not there is an error, not a new store.
    ``autocheckpoint=False``: see :func:`open_sqlite` (PostgreSQL ignores it).
    """
    location = parse_location(url)
    if location.backend == "postgresql":
        from kvcache_cli.store.postgres import open_postgres

        db: Any = open_postgres(location.target)
    else:
        db = open_sqlite(location.target, busy_timeout_ms, must_exist, autocheckpoint)
    store = Store(db, location)
    try:
        migrate(store)
    except Exception:
        store.close()
        raise
    return store
