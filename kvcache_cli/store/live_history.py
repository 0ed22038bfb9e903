"""What ``kvcache serve`` reads of a session's stored history to place a request.

A live turn first asks where the stored history ends (:func:`tail`: one indexed
query, whatever the session's length) and reads the stored messages themselves
(:func:`first_messages`) only when it cannot tell otherwise whether the request
extends them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvcache_cli.store.connection import Store


@dataclass(frozen=True)
class HistoryTail:
    """A session's id and creation time, its metadata, how many messages it stores and
    the last one's ``(role, content)`` (None when it stores none)."""

    session_id: int
    created_at: str
    metadata: str | None
    count: int
    last: tuple[str, str] | None

    def same_history(self, other: HistoryTail) -> bool:
        """Whether ``other`` is this session with the same stored tail (metadata aside)."""
        return (self.session_id, self.created_at, self.count, self.last) == (
            other.session_id,
            other.created_at,
            other.count,
            other.last,
        )


def tail(store: Store, key: str) -> HistoryTail | None:
    """The :class:`HistoryTail` of the session called ``key`` (None when unknown)."""
    rows = store.query(
        "SELECT s.id, s.created_at, s.metadata, m.message_index, m.role, m.content FROM sessions s "
        "LEFT JOIN messages m ON m.session_id = s.id AND m.message_index = "
        "(SELECT MAX(message_index) FROM messages WHERE session_id = s.id) "
        "WHERE s.key = ?",
        (key,),
    )
    if not rows:
        return None
    sid, created, metadata, index, role, content = rows[0]
    last = (str(role), str(content)) if index is not None else None
    return HistoryTail(int(sid), str(created), metadata, int(index) + 1 if index is not None else 0, last)


def first_messages(store: Store, session_id: int, limit: int) -> list[tuple[str, str]]:
    """The first ``limit`` stored ``(role, content)`` of a session, in order."""
    rows: list[Any] = store.query(
        "SELECT role, content FROM messages WHERE session_id = ? AND message_index < ? "
        "ORDER BY message_index",
        (int(session_id), int(limit)),
    )
    return [(str(r), str(c)) for r, c in rows]


def recent_sessions(store: Store, limit: int) -> list[tuple[str, int]]:
    """``(key, stored message count)`` of the ``limit`` most recently active sessions."""
    rows = store.query(
        "SELECT s.key, (SELECT COALESCE(MAX(m.message_index) + 1, 0) FROM messages m "
        "WHERE m.session_id = s.id) "
        "FROM sessions s ORDER BY s.last_activity DESC, s.id DESC LIMIT ?",
        (int(limit),),
    )
    return [(str(key), int(count)) for key, count in rows]


def message_at(store: Store, key: str, index: int) -> tuple[str, str] | None:
    """``(role, content)`` of message ``index`` of the session called ``key`` (None: none)."""
    rows = store.query(
        "SELECT m.role, m.content FROM messages m JOIN sessions s ON s.id = m.session_id "
        "WHERE s.key = ? AND m.message_index = ?",
        (key, int(index)),
    )
    return (str(rows[0][0]), str(rows[0][1])) if rows else None
