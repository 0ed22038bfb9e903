"""The statistics report: global counters, session states, recent history, one session's detail."""

from __future__ import annotations

import json
from typing import Any

from kvcache_cli.services.core import Core
from kvcache_cli.store import models as m
from kvcache_cli.store import reports
from kvcache_cli.timefmt import utc_iso


def statistics(core: Core, session_key: str | None = None, history: int = 10) -> dict[str, Any]:
    """The statistics export, the session states and recent operations."""
    store = core.store
    stats = reports.counters(store)
    counts = reports.table_counts(store)
    session = core.session(session_key) if session_key is not None else None
    capacity = core.capacity()  # once: the estimate may ask the OS for free memory
    # plain rows, not model instances (thousands of sessions); same attribute names
    rows = reports.session_rows(store, session.get_id() if session is not None else None)
    states = [session_state(core, s, capacity) for s in rows]
    data: dict[str, Any] = {
        "total_clears": stats.total_clears,
        "total_retrievals": stats.total_retrievals,
        "entries_preserved": stats.entries_preserved,
        "entries_cleared": stats.entries_cleared,
        "entries_retrieved": stats.entries_retrieved,
        # the sessions state is held for; maintenance releases an idle session's cache
        # and snapshots, so "active" = still holding either
        "active_sessions": counts["active_sessions"],
        "session_count": counts["sessions"],
        "last_operation": utc_iso(stats.last_operation) if stats.last_operation else None,
        "operation_history_count": counts["operations"],
        "total_snapshots": stats.total_snapshots,
        "total_restores": stats.total_restores,
        "snapshot_count": counts["snapshots"],
        "message_count": counts["messages"],
        "cache_size_bytes": sum(s["cache_size_bytes"] for s in states),
        "capacity_bytes": capacity,
        "memory_threshold_percent": core.config.cache.memory_threshold_percent,
        "database": store.location.display,
        "backend": store.backend,
        "database_size_bytes": store.size_bytes(),
        "sessions": states,
        "recent_operations": [
            {
                "operation_type": op.operation_type,
                "timestamp": utc_iso(op.timestamp),
                "entries_affected": op.entries_affected,
                "session_id": op.session_key,
                "details": op.details,
            }
            for op in reports.recent_operations(store, history, session_key)
        ],
    }
    if session is not None:
        data["session"] = session_detail(core, session)
    return data


def session_state(core: Core, session: Any, capacity: int | None = None) -> dict[str, Any]:
    """A session's cache state plus the persisted extras.

    ``session``: a ``Session`` row (model or named tuple); ``capacity``: the default
    capacity when already computed.
    """
    return {
        "session_id": session.key,
        "conversation_count": session.conversation_count,
        "turn_count": session.turn_count,
        "last_cleared_at": utc_iso(session.last_cleared_at) if session.last_cleared_at else None,
        "last_snapshot_id": session.last_snapshot_id,
        "cache_size_bytes": session.cache_size_bytes,
        "capacity_bytes": session.capacity_bytes or (capacity if capacity is not None else core.capacity()),
        "entry_count": session.entry_count,
        "total_clears": session.total_clears,
        "last_activity": utc_iso(session.last_activity),
        "metadata": json.loads(session.metadata or "{}"),
    }


def session_detail(core: Core, session: m.Session) -> dict[str, Any]:
    """One session's snapshots, summary and cache usage turn by turn."""
    from kvcache_cli.services.cache_ops import list_snapshots  # the cache services: only here

    summary = reports.summary_row(core.store, session.get_id())
    return {
        "message_count": reports.message_count(core.store, session.get_id()),
        "snapshots": [s.to_dict() for s in list_snapshots(core, session.key)],
        "summary": None
        if summary is None
        else {
            "text": summary.text,
            "length": len(summary.text),
            "token_count": summary.token_count,
            "messages_summarized": summary.messages_summarized,
            "clear_count": summary.clear_count,
            "source": summary.source,
        },
        "usage": [
            {"turn": t, "cache_size_bytes": b, "cleared": bool(c), "clear_reason": r}
            for t, b, c, r in reports.usage(core.store, session.get_id())
        ],
    }
