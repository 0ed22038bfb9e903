"""A session's active cache, engagement, cumulative summary and turn log: their SQL.

Cache and snapshot entries share their columns (``ENTRY_COLUMNS``) and come back as
``KVEntry`` values (``engine.entries``: plain data, no logic).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kvcache_cli.engine.entries import KVEntry
from kvcache_cli.store import models as m
from kvcache_cli.store.bulk import bulk_insert
from kvcache_cli.store.connection import Store

ENTRY_COLUMNS = (
    "key_hash, key_data, key_type, value_bytes, layer_index, head_index, importance, "
    "access_count, last_accessed, size_bytes, tokens, message_index"
)


def _to_datetime(value: Any) -> Any:
    """``last_accessed`` as the field reads it; SQLite's ISO text parsed directly (what
    the field does first, minus its per-value overhead: this runs once per cache entry)."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    return m.CacheEntry.last_accessed.python_value(value)


def entries_from_rows(rows: list[tuple[Any, ...]]) -> list[KVEntry]:
    """KVEntry values from raw ``ENTRY_COLUMNS`` rows (no model instances: hot path)."""
    to_datetime = _to_datetime
    return [
        KVEntry(
            key_hash=r[0],
            key_data=r[1],
            key_type=r[2],
            value_bytes=r[3],
            layer_index=r[4],
            head_index=r[5],
            importance_score=r[6],
            access_count=r[7],
            last_accessed=to_datetime(r[8]),
            size_bytes=r[9],
            tokens=r[10],
            message_index=r[11],
        )
        for r in rows
    ]


def entry_row(entry: KVEntry, position: int) -> dict[str, Any]:
    """The column values of ``entry`` at ``position`` (cache or snapshot entry)."""
    return {
        "key_hash": entry.key_hash,
        "key_data": entry.key_data,
        "key_type": entry.key_type,
        "value_bytes": entry.value_bytes,
        "layer_index": entry.layer_index,
        "head_index": entry.head_index,
        "importance": entry.importance_score,
        "access_count": entry.access_count,
        "last_accessed": entry.last_accessed,
        "size_bytes": entry.size_bytes,
        "tokens": entry.tokens,
        "message_index": entry.message_index,
        "position": position,
    }


# ----------------------------------------------------------------------------- active cache
def active_entries(store: Store, session_id: int) -> list[KVEntry]:
    """The session's active cache, in position order."""
    rows = store.query(
        f"SELECT {ENTRY_COLUMNS} FROM cache_entries WHERE session_id = ? ORDER BY position, id",
        (int(session_id),),
    )
    return entries_from_rows(rows)


def add_entries(
    store: Store, session_id: int, entries: list[KVEntry], position: int, cached: set[str] | None = None
) -> None:
    """Append ``entries`` from ``position`` on; a key already in the cache is skipped.

    ``cached``: every key of the session's cache, when the caller has just read it in this
    transaction (``active_entries``): the keys are not read again.
    """
    if not entries:
        return
    rows = []
    for offset, entry in enumerate(entries):
        row = entry_row(entry, position + offset)
        row["session"] = session_id
        rows.append(row)
    hashes = [r["key_hash"] for r in rows]
    if cached is not None:
        existing = cached.intersection(hashes)
    else:
        existing = {
            h
            for (h,) in store.query(
                "SELECT key_hash FROM cache_entries WHERE session_id = ? "
                f"AND key_hash IN ({', '.join('?' * len(hashes))})",
                (int(session_id), *hashes),
            )
        }
    bulk_insert(store, m.CacheEntry, [r for r in rows if r["key_hash"] not in existing])


def keep_only(store: Store, session_id: int, keep: Sequence[str]) -> None:
    """Delete the session's cache entries except the keys in ``keep`` (all when empty)."""
    delete = m.CacheEntry.delete().where(m.CacheEntry.session == session_id)
    if keep:
        delete = delete.where(m.CacheEntry.key_hash.not_in(list(keep)))
    store.bind(delete).execute()


def drop_after(store: Store, session_id: int, index: int) -> None:
    """Delete the cache entries of messages after ``index``."""
    sql = "DELETE FROM cache_entries WHERE session_id = ? AND message_index > ?"
    store.query(sql, (int(session_id), int(index)))


def totals(store: Store, session_id: int) -> tuple[int, int]:
    """``(bytes, entries)`` of the session's active cache."""
    size, count = store.query(
        "SELECT COALESCE(SUM(size_bytes), 0), count(*) FROM cache_entries WHERE session_id = ?",
        (int(session_id),),
    )[0]
    return int(size), int(count)


# ----------------------------------------------------------------------------- engagement
def engagement(store: Store, session_id: int) -> dict[str, float]:
    """``{key hash: engagement}`` of the session's keys."""
    return dict(
        store.query("SELECT key_hash, score FROM engagement WHERE session_id = ?", (int(session_id),))
    )


def engage(store: Store, session_id: int, touched: list[str], raised: Callable[[float], float]) -> None:
    """Retrieved keys get ``raised(current)`` (a new key starts from 0.3); every other key
    above the 0.1 floor decays x0.95."""
    sid = int(session_id)
    marks = ", ".join("?" * len(touched))
    current = dict(
        store.query(
            f"SELECT key_hash, score FROM engagement WHERE session_id = ? AND key_hash IN ({marks})",
            (sid, *touched),
        )
    )
    # scoring.decayed_engagement in SQL; a key already at the 0.1 floor stays there, so only
    # the rows above it are rewritten (most of a long session's keys sit at the floor)
    greatest = "max" if store.is_sqlite else "GREATEST"
    store.query(
        f"UPDATE engagement SET score = {greatest}(0.1, score * 0.95) "
        f"WHERE session_id = ? AND score > 0.1 AND key_hash NOT IN ({marks})",
        (sid, *touched),
    )
    for key in touched:
        value = raised(current.get(key, 0.3))
        if key in current:
            store.query(
                "UPDATE engagement SET score = ? WHERE session_id = ? AND key_hash = ?", (value, sid, key)
            )
        else:
            store.query(
                "INSERT INTO engagement (session_id, key_hash, score) VALUES (?, ?, ?)", (sid, key, value)
            )


# ----------------------------------------------------------------------------- summary
@dataclass
class StoredSummary:
    text: str
    source: str
    messages_summarized: int
    clear_count: int


def summary(store: Store, session_id: int) -> StoredSummary | None:
    """The session's cumulative summary, if it has one."""
    rows = store.query(
        "SELECT text, source, messages_summarized, clear_count FROM summaries WHERE session_id = ?",
        (int(session_id),),
    )
    if not rows:
        return None
    text, source, done, clears = rows[0]
    return StoredSummary(text, source, int(done), int(clears))


def summary_text(store: Store, session_id: int) -> str | None:
    rows = store.query("SELECT text FROM summaries WHERE session_id = ?", (int(session_id),))
    return str(rows[0][0]) if rows else None


def write_summary(
    store: Store, session_id: int, text: str, token_count: int, summarized: int, source: str, now: datetime
) -> None:
    """Create or replace the session's summary (its clear count goes up by one)."""
    updated = m.Summary.updated_at.db_value(now)
    if summary(store, session_id) is None:
        store.query(
            "INSERT INTO summaries (session_id, text, token_count, messages_summarized, clear_count, "
            "source, updated_at) VALUES (?, ?, ?, ?, 1, ?, ?)",
            (int(session_id), text, token_count, summarized, source, updated),
        )
    else:
        store.query(
            "UPDATE summaries SET text = ?, token_count = ?, messages_summarized = ?, "
            "clear_count = clear_count + 1, source = ?, updated_at = ? WHERE session_id = ?",
            (text, token_count, summarized, source, updated, int(session_id)),
        )


# ----------------------------------------------------------------------------- turn log
def log_turn(
    store: Store,
    session_id: int,
    turn: int,
    message_index: int,
    cache_size_bytes: int,
    entry_count: int,
    clear_reason: str | None,
    retrieved: int,
) -> None:
    """One row of the cache-usage sawtooth (raw: once per replayed turn)."""
    store.query(
        "INSERT INTO turn_log (session_id, turn_index, message_index, cache_size_bytes, entry_count, "
        "cleared, clear_reason, retrieved) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            int(session_id),
            turn,
            message_index,
            cache_size_bytes,
            entry_count,
            m.TurnLog.cleared.db_value(clear_reason is not None),
            clear_reason,
            retrieved,
        ),
    )


def last_clear_index(store: Store, session_id: int) -> int:
    """Message index of the question whose turn made the session's last clear (0: none)."""
    rows = store.query(
        "SELECT max(message_index) FROM turn_log WHERE session_id = ? AND cleared = ?",
        (int(session_id), m.TurnLog.cleared.db_value(True)),
    )
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0
