"""The full-text index behind tier 3, dispatched to the backend's own machinery.

SQLite uses FTS5 (``search_sqlite``); PostgreSQL uses tsvector + GIN
(``search_postgres``). Both take the caller's transaction: an index write commits or
rolls back with the messages it describes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kvcache_cli.retrieval.ranking import Hit
from kvcache_cli.store.connection import Store


def _module(store: Store) -> Any:
    if store.is_sqlite:
        from kvcache_cli.store import search_sqlite

        return search_sqlite
    from kvcache_cli.store import search_postgres

    return search_postgres


def _connection(store: Store) -> Any:
    """The DB-API connection with an ``execute`` method (psycopg2's gets a wrapper)."""
    conn = store.db.connection()
    if store.is_sqlite:
        return conn
    from kvcache_cli.store.search_postgres import PgConnection

    return PgConnection(conn)


def create_index(store: Store) -> None:
    """Create the index and fill it from the messages already stored."""
    module = _module(store)
    conn = _connection(store)
    for statement in module.SCHEMA:
        conn.execute(statement)
    module.rebuild(conn)


def index_messages(store: Store, rows: Iterable[tuple[int, int, str]]) -> None:
    """Index ``(message_id, session_id, content)`` rows."""
    _module(store).index_messages(_connection(store), rows)


def delete_session(store: Store, session_id: int) -> None:
    """Drop a session's messages from the index (before deleting the rows)."""
    _module(store).delete_session(_connection(store), session_id)


def delete_messages(store: Store, message_ids: list[int]) -> None:
    """Drop some messages from the index (before deleting the rows)."""
    _module(store).delete_messages(_connection(store), message_ids)


def search_messages(
    store: Store, query: str, session_id: int | None, limit: int, **options: Any
) -> list[Hit]:
    """Ranked hits for ``query`` in one session (or all when ``session_id`` is None).

    ``options``: the backend's keyword knobs (e.g. ``max_session_matches``, ``candidates``).
    """
    result: list[Hit] = _module(store).search_messages(
        _connection(store), query, session_id, limit, **options
    )
    return result


def rank_texts(
    query: str,
    texts: list[str],
    indexes: list[int | None] | None = None,
    names: list[str | None] | None = None,
    limit: int | None = None,
) -> list[tuple[int, float, list[str]]]:
    """Rank in-memory texts (tiers 1 and 2) with the tier-3 method (``ranking``); best ``limit``."""
    from kvcache_cli.retrieval.ranking import rank_texts as rank

    return rank(query, texts, indexes=indexes, names=names, limit=limit)
