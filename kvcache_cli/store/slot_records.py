"""Where the store keeps llama-server slot file names that are not on a snapshot row.

Two records, both read by ``services.slot_files``:

- the files ``kvcache serve`` saved for a live session (session metadata
  ``slot_files_saved``): the session may restore them, so nothing prunes them while
  the session lives;
- the files of *forgotten* sessions still waiting to be deleted (no slot folder was
  known): the session row is gone, so each forget keeps them in one operation record
  (``operation_type = 'slot_files_waiting'``, details a JSON list of names), which
  history trimming leaves alone (``reports.trim_operations``).

Every statement is raw SQL through ``Store.query``; call inside the caller's transaction.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kvcache_cli.store.models import Operation, Session
from kvcache_cli.store.sessions_admin import metadata_of, set_metadata_names

if TYPE_CHECKING:
    from kvcache_cli.store.backend import Store

SAVED_KEY = "slot_files_saved"
"""Session metadata key: slot files ``serve`` saved for the session (kept while it lives)."""

WAITING_OPERATION = "slot_files_waiting"
"""Operation type recording a forgotten session's slot files not deleted yet."""


def _names(value: Any) -> list[str]:
    return sorted({str(n) for n in value}) if isinstance(value, list) else []


def lock(store: Store, session_ids: list[int]) -> None:
    """Lock the sessions' rows until the transaction ends before their metadata is read
    and rewritten (PostgreSQL; SQLite's write transaction already holds the database),
    so a turn writing the same row concurrently is not overwritten."""
    if store.is_sqlite or not session_ids:
        return
    for lo in range(0, len(session_ids), 500):
        part = sorted(session_ids)[lo : lo + 500]
        store.query(f"SELECT id FROM sessions WHERE id IN ({', '.join('?' * len(part))}) FOR UPDATE", part)


def saved_of(store: Store, sid: int) -> list[str]:
    """The slot files ``serve`` saved for the session."""
    return _names(metadata_of(store, sid).get(SAVED_KEY))


def saved_of_sessions(store: Store, session_ids: list[int]) -> dict[int, list[str]]:
    """``{session id: slot files serve saved}`` of the sessions that name any (one query
    per 500 sessions)."""
    out: dict[int, list[str]] = {}
    for lo in range(0, len(session_ids), 500):
        part = session_ids[lo : lo + 500]
        rows = store.query(
            f"SELECT id, metadata FROM sessions WHERE id IN ({', '.join('?' * len(part))}) "
            "AND metadata LIKE ?",
            [*part, f"%{SAVED_KEY}%"],
        )
        for sid, text in rows:
            try:
                meta = json.loads(text or "{}")
            except ValueError:
                continue
            names = _names(meta.get(SAVED_KEY)) if isinstance(meta, dict) else []
            if names:
                out[int(sid)] = names
    return out


def set_saved(store: Store, sid: int, names: list[str]) -> None:
    """Record the session's saved slot files (an empty list removes the record)."""
    set_metadata_names(store, sid, SAVED_KEY, names)


def idle_with_saved(store: Store, cutoff: datetime) -> list[int]:
    """Ids of sessions inactive since ``cutoff`` that still name files ``serve`` saved."""
    rows = store.query(
        "SELECT id FROM sessions WHERE last_activity < ? AND metadata LIKE ?",
        (Session.last_activity.db_value(cutoff), f"%{SAVED_KEY}%"),
    )
    return [int(sid) for (sid,) in rows]


def forgotten_waiting(store: Store) -> dict[str, list[str]]:
    """``{forgotten session key: slot files}`` still waiting to be deleted."""
    rows = store.query(
        "SELECT session_key, details FROM operations WHERE operation_type = ? ORDER BY id",
        (WAITING_OPERATION,),
    )
    out: dict[str, list[str]] = {}
    for key, details in rows:
        try:
            names = _names(json.loads(details or "[]"))
        except ValueError:
            names = []
        if names:
            out[str(key)] = sorted(set(out.get(str(key), [])) | set(names))
    return out


def set_forgotten_waiting(store: Store, key: str, names: list[str], now: datetime) -> None:
    """Replace the waiting record of forgotten session ``key`` (empty ``names``: drop it)."""
    store.query(
        "DELETE FROM operations WHERE operation_type = ? AND session_key = ?", (WAITING_OPERATION, key)
    )
    if names:
        store.query(
            "INSERT INTO operations (session_key, operation_type, timestamp, entries_affected, details) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                key,
                WAITING_OPERATION,
                Operation.timestamp.db_value(now),
                len(set(names)),
                json.dumps(sorted(set(names))),
            ),
        )
