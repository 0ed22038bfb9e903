"""Sessions and their message history: every SQL statement the turn services need on them.

Session rows are read and written with raw SQL (a replay reads and updates its
session every turn; peewee's query building dominated) into ``models.Session``
records, which are plain values here: nothing is saved through the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from kvcache_cli.store import models as m
from kvcache_cli.store.bulk import bulk_insert
from kvcache_cli.store.connection import Store

_FIELDS = m.Session._meta.sorted_fields
_SELECT = f"SELECT {', '.join(f.column_name for f in _FIELDS)} FROM sessions WHERE key = ?"


def find(store: Store, key: str, for_update: bool = False) -> m.Session | None:
    """The session called ``key`` (locked until the transaction ends with ``for_update`` on
    PostgreSQL; SQLite's write transaction already holds the whole database)."""
    sql = _SELECT + (" FOR UPDATE" if for_update and not store.is_sqlite else "")
    rows = store.query(sql, (key,))
    if not rows:
        return None
    row = m.Session(**{f.name: f.python_value(v) for f, v in zip(_FIELDS, rows[0], strict=True)})
    cast(Any, row)._dirty.clear()  # a record of what is stored, not a change
    return row


def create(store: Store, key: str, now: datetime, capacity: int) -> m.Session:
    """Insert a new session (a concurrent creator on PostgreSQL is tolerated) and lock it."""
    query = m.Session.insert(key=key, created_at=now, last_activity=now, capacity_bytes=capacity)
    if not store.is_sqlite:  # a concurrent writer may be creating it too: insert once
        query = query.on_conflict_ignore()
    store.bind(query).execute()
    row = find(store, key, for_update=True)
    if row is None:  # pragma: no cover - just inserted in this transaction
        raise AssertionError(f"session {key!r} vanished")
    return row


def save(store: Store, session: m.Session) -> None:
    """Write every field of ``session`` but its id (one UPDATE)."""
    meta = m.Session._meta
    fields = [f for f in meta.sorted_fields if f is not meta.primary_key]
    sql = f"UPDATE sessions SET {', '.join(f.column_name + ' = ?' for f in fields)} WHERE id = ?"
    store.query(sql, (*(f.db_value(getattr(session, f.name)) for f in fields), session.get_id()))


def exists(store: Store, key: str) -> bool:
    return bool(store.query("SELECT 1 FROM sessions WHERE key = ?", (key,)))


def keys_of(store: Store, session_ids: Sequence[int]) -> dict[int, str]:
    """``{session id: key}`` of the given sessions."""
    if not session_ids:
        return {}
    marks = ", ".join("?" * len(session_ids))
    return dict(store.query(f"SELECT id, key FROM sessions WHERE id IN ({marks})", list(session_ids)))


# ----------------------------------------------------------------------------- messages
def stored_count(store: Store, session_id: int) -> int:
    """Messages stored (contiguous from index 0: max + 1, read from the unique index)."""
    sql = "SELECT COALESCE(MAX(message_index) + 1, 0) FROM messages WHERE session_id = ?"
    return int(store.query(sql, (int(session_id),))[0][0])


def count_messages(store: Store, session_id: int, below: int | None = None) -> int:
    """Messages of the session (with ``below``: those of a lower index)."""
    bound, limit = (" AND message_index < ?", (below,)) if below is not None else ("", ())
    sql = f"SELECT count(*) FROM messages WHERE session_id = ?{bound}"
    return int(store.query(sql, (int(session_id), *limit))[0][0])


def messages_after_id(
    store: Store, session_id: int, after_id: int, below: int | None = None
) -> list[tuple[Any, ...]]:
    """(id, message_index, role, name, content, timestamp) of the session's messages with
    an id above ``after_id`` (with ``below``: of a lower index), in id order."""
    bound, limit = (" AND message_index < ?", (below,)) if below is not None else ("", ())
    return store.query(
        "SELECT id, message_index, role, name, content, timestamp FROM messages "
        f"WHERE session_id = ? AND id > ?{bound} ORDER BY id",
        (int(session_id), after_id, *limit),
    )


def insert_messages(
    store: Store,
    session_id: int,
    start: int,
    rows: Sequence[tuple[str, str | None, str, int, datetime | None]],
) -> list[tuple[int, int, str]]:
    """Store ``(role, name, content, tokens, timestamp)`` at indexes ``start``...

    Returns ``(id, message_index, content)`` of the session's messages from ``start``.
    """
    bulk_insert(
        store,
        m.Message,
        [
            {
                "session": session_id,
                "message_index": start + i,
                "role": role,
                "name": name,
                "content": content,
                "tokens": tokens,
                "timestamp": timestamp,
            }
            for i, (role, name, content, tokens, timestamp) in enumerate(rows)
        ],
    )
    found = store.query(
        "SELECT id, message_index, content FROM messages "
        "WHERE session_id = ? AND message_index >= ? ORDER BY message_index",
        (int(session_id), int(start)),
    )
    return [(int(mid), int(idx), str(content)) for mid, idx, content in found]


def history(store: Store, session_id: int) -> list[tuple[int, str, str]]:
    """``(message_index, role, content)`` of every stored message, in order."""
    return store.query(
        "SELECT message_index, role, content FROM messages WHERE session_id = ? ORDER BY message_index",
        (int(session_id),),
    )


def first_messages(store: Store, session_id: int, count: int) -> list[tuple[Any, ...]]:
    """``(role, content, name, timestamp, tokens)`` of the first ``count`` messages."""
    to_time = m.Message.timestamp.python_value
    rows = store.query(
        "SELECT role, content, name, timestamp, tokens FROM messages "
        "WHERE session_id = ? AND message_index < ? ORDER BY message_index",
        (int(session_id), int(count)),
    )
    return [(role, content, name, to_time(ts), int(tokens)) for role, content, name, ts, tokens in rows]


def tail(
    store: Store, session_id: int, since: int, limit: int, below: int | None = None
) -> list[tuple[str, str, str | None]]:
    """``(role, content, name)`` of the last ``limit`` messages from index ``since`` (and
    before index ``below`` when given), in order."""
    bound = "" if below is None else f" AND message_index < {int(below)}"
    rows = store.query(
        f"SELECT role, content, name FROM messages WHERE session_id = ? AND message_index >= ?{bound} "
        "ORDER BY message_index DESC LIMIT ?",
        (int(session_id), int(since), int(limit)),
    )
    return list(reversed(rows))


def rerun_messages(
    store: Store, session_id: int, start: int, tokens: Sequence[int]
) -> list[tuple[int, int, str]]:
    """Messages ``start``.. already stored (by ``import``) that a turn now runs: set their
    token counts to the turn's; returns their ``(id, message_index, content)``."""
    if not tokens:
        return []
    sid = int(session_id)
    for i, count in enumerate(tokens):  # a turn's few messages
        store.query(
            "UPDATE messages SET tokens = ? WHERE session_id = ? AND message_index = ?",
            (int(count), sid, int(start) + i),
        )
    found = store.query(
        "SELECT id, message_index, content FROM messages "
        "WHERE session_id = ? AND message_index >= ? AND message_index < ? ORDER BY message_index",
        (sid, int(start), int(start) + len(tokens)),
    )
    return [(int(mid), int(idx), str(content)) for mid, idx, content in found]


def last_user_index(store: Store, session_id: int) -> int:
    """Index of the session's last user message (-1 when there is none)."""
    rows = store.query(
        "SELECT max(message_index) FROM messages WHERE session_id = ? AND role = 'user'", (int(session_id),)
    )
    return int(rows[0][0]) if rows and rows[0][0] is not None else -1


def ids_after(store: Store, session_id: int, index: int) -> list[int]:
    """Ids of the session's messages after ``index``."""
    sql = "SELECT id FROM messages WHERE session_id = ? AND message_index > ?"
    return [int(r[0]) for r in store.query(sql, (int(session_id), int(index)))]


def delete_messages(store: Store, ids: Sequence[int]) -> None:
    """Delete messages and their vectors (drop them from the full-text index first)."""
    for start in range(0, len(ids), 500):
        chunk = list(ids[start : start + 500])
        marks = ", ".join("?" * len(chunk))
        store.query(f"DELETE FROM embeddings WHERE message_id IN ({marks})", chunk)
        store.query(f"DELETE FROM messages WHERE id IN ({marks})", chunk)


def by_ids(store: Store, ids: Sequence[int]) -> dict[int, tuple[Any, ...]]:
    """``{id: (id, message_index, role, content, session_id)}`` of the given messages."""
    if not ids:
        return {}
    sql = "SELECT id, message_index, role, content, session_id FROM messages WHERE id IN ({})"
    return {r[0]: r for r in store.query(sql.format(", ".join("?" * len(ids))), list(ids))}


def indexes_of(store: Store, ids: Sequence[int]) -> list[tuple[int, int]]:
    """``(id, message_index)`` of the given messages (500 per statement)."""
    out: list[tuple[int, int]] = []
    for start in range(0, len(ids), 500):
        chunk = list(ids[start : start + 500])
        sql = f"SELECT id, message_index FROM messages WHERE id IN ({', '.join('?' * len(chunk))})"
        out += [(int(mid), int(idx)) for mid, idx in store.query(sql, chunk)]
    return out


def roles_and_contents(store: Store, session_id: int, indexes: Sequence[int]) -> dict[int, tuple[str, str]]:
    """``{message_index: (role, content)}`` of the given messages of a session (500 per statement)."""
    out: dict[int, tuple[str, str]] = {}
    for start in range(0, len(indexes), 500):
        chunk = list(indexes[start : start + 500])
        for idx, role, content in store.query(
            "SELECT message_index, role, content FROM messages WHERE session_id = ? "
            f"AND message_index IN ({', '.join('?' * len(chunk))})",
            (int(session_id), *chunk),
        ):
            out[int(idx)] = (str(role), str(content or ""))
    return out


def speaker_names(store: Store, session_id: int, indexes: Sequence[int]) -> dict[int, str]:
    """``{message_index: name}`` of the given messages that have a speaker name."""
    out: dict[int, str] = {}
    for start in range(0, len(indexes), 500):
        chunk = list(indexes[start : start + 500])
        for idx, name in store.query(
            "SELECT message_index, name FROM messages WHERE session_id = ? AND name IS NOT NULL "
            f"AND message_index IN ({', '.join('?' * len(chunk))})",
            (int(session_id), *chunk),
        ):
            if name:
                out[int(idx)] = str(name)
    return out
