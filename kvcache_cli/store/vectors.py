"""Stored message embeddings (``embeddings`` table): every SQL statement on them.

Vectors arrive and leave as float32 blobs; ``retrieval.embeddings`` packs, caches and
compares them.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from peewee import fn

from kvcache_cli.store import models as m
from kvcache_cli.store.connection import Store


def stored_dim(store: Store, model: str) -> int | None:
    """The size of the vectors stored under ``model``, or None when there are none."""
    query = m.Embedding.select(m.Embedding.dim).where(m.Embedding.model == model).limit(1).tuples()
    row = store.bind(query).first()
    return int(row[0]) if row else None


def drop_other_sizes(store: Store, model: str, dim: int) -> int:
    """Delete the vectors of ``model`` whose size is not ``dim`` (in a transaction); how many."""
    query = m.Embedding.delete().where((m.Embedding.model == model) & (m.Embedding.dim != dim))
    return int(store.bind(query).execute())


def insert(store: Store, model: str, rows: list[tuple[int, int, bytes]], now: datetime) -> None:
    """Insert ``(message id, dim, blob)`` rows under ``model``; an existing vector is kept."""
    data = [
        {"message": mid, "model": model, "dim": dim, "vector": blob, "created_at": now}
        for mid, dim, blob in rows
    ]
    for start in range(0, len(data), 100):
        store.bind(m.Embedding.insert_many(data[start : start + 100]).on_conflict_ignore()).execute()


def missing(store: Store, session_id: int, model: str, limit: int) -> list[tuple[int, str]]:
    """Up to ``limit`` (id, content) of the session's messages without a ``model`` vector.

    Raw SQL: ``kvcache serve`` asks this after every turn, and building the query with
    the ORM took 70 times as long as running it."""
    rows = store.query(
        "SELECT m.id, m.content FROM messages m "
        "LEFT JOIN embeddings e ON e.message_id = m.id AND e.model = ? "
        "WHERE m.session_id = ? AND e.id IS NULL AND m.content != '' "
        "ORDER BY m.message_index LIMIT ?",
        (model, int(session_id), int(limit)),
    )
    return [(int(mid), str(content)) for mid, content in rows if str(content).strip()]


def count_missing(store: Store, session_id: int, model: str) -> int:
    """How many of the session's messages with text have no ``model`` vector yet."""
    rows = store.query(
        "SELECT count(*) FROM messages m "
        "LEFT JOIN embeddings e ON e.message_id = m.id AND e.model = ? "
        "WHERE m.session_id = ? AND e.id IS NULL AND trim(m.content) != ''",
        (model, int(session_id)),
    )
    return int(rows[0][0]) if rows else 0


def _session_scope(session_id: int, model: str, dim: int) -> Any:
    emb: Any = m.Embedding
    msg: Any = m.Message
    return (msg.session == session_id) & (emb.model == model) & (emb.dim == dim)


def session_watermark(store: Store, session_id: int, model: str, dim: int) -> tuple[int, int]:
    """``(rows, highest id)`` of the session's vectors of ``model``/``dim`` (one indexed query)."""
    emb: Any = m.Embedding
    msg: Any = m.Message
    query = (
        emb.select(fn.COUNT(emb.id), fn.MAX(emb.id))
        .join(msg, on=(emb.message == msg.id))
        .where(_session_scope(session_id, model, dim))
        .tuples()
    )
    count, last = store.bind(query).get()
    return int(count or 0), int(last or 0)


def session_vectors(
    store: Store, session_id: int, model: str, dim: int, after_id: int = 0
) -> Iterator[tuple[int, int, bytes]]:
    """``(embedding id, message id, blob)`` of the session's vectors after ``after_id``, by id."""
    emb: Any = m.Embedding
    msg: Any = m.Message
    query = (
        emb.select(emb.id, emb.message, emb.vector)
        .join(msg, on=(emb.message == msg.id))
        .where(_session_scope(session_id, model, dim) & (emb.id > after_id))
        .order_by(emb.id)
        .tuples()
    )
    rows: Iterator[tuple[int, int, bytes]] = store.bind(query).iterator()
    return rows


def all_vectors(store: Store, model: str, dim: int) -> Iterator[tuple[int, bytes]]:
    """``(message id, blob)`` of every vector of ``model``/``dim``."""
    emb: Any = m.Embedding
    query = emb.select(emb.message, emb.vector).where((emb.model == model) & (emb.dim == dim)).tuples()
    rows: Iterator[tuple[int, bytes]] = store.bind(query).iterator()
    return rows
