"""The statistics report: the seed's export, session states, history, one session's detail."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from peewee import fn

from kvcache_cli.store import models as m

if TYPE_CHECKING:
    from kvcache_cli.services.manager import KVCacheManager


def statistics(manager: KVCacheManager, session_key: str | None = None, history: int = 10) -> dict[str, Any]:
    """The seed's statistics export, the session states and recent operations."""
    stats = m.Statistics.get_by_id(1)
    op_count = m.Operation.select().count()
    sessions_query = m.Session.select().order_by(m.Session.key)
    ops_query = m.Operation.select().order_by(m.Operation.id.desc()).limit(max(history, 0))
    if session_key is not None:
        session = manager._session(session_key)
        sessions_query = sessions_query.where(m.Session.id == session.id)
        ops_query = ops_query.where(m.Operation.session_key == session_key)
    capacity = manager.capacity()  # once: the estimate may ask the OS for free memory
    # plain rows, not model instances (thousands of sessions); same attribute names
    states = [session_state(manager, s, capacity) for s in sessions_query.namedtuples()]
    data: dict[str, Any] = {
        "total_clears": stats.total_clears,
        "total_retrievals": stats.total_retrievals,
        "entries_preserved": stats.entries_preserved,
        "entries_cleared": stats.entries_cleared,
        "entries_retrieved": stats.entries_retrieved,
        # the seed counts the sessions it holds state for; maintenance releases an idle
        # session's cache and snapshots, so "active" = still holding either
        "active_sessions": m.Session.select()
        .where(
            (m.Session.entry_count > 0)
            | fn.EXISTS(m.Snapshot.select(m.Snapshot.id).where(m.Snapshot.session == m.Session.id))
        )
        .count(),
        "session_count": m.Session.select().count(),
        "last_operation": stats.last_operation.isoformat() if stats.last_operation else None,
        "operation_history_count": op_count,
        "total_snapshots": stats.total_snapshots,
        "total_restores": stats.total_restores,
        "snapshot_count": m.Snapshot.select().count(),
        "message_count": m.Message.select().count(),
        "cache_size_bytes": sum(s["cache_size_bytes"] for s in states),
        "capacity_bytes": capacity,
        "memory_threshold_percent": manager.config.cache.memory_threshold_percent,
        "database": manager.store.location.display,
        "backend": manager.store.backend,
        "database_size_bytes": manager.store.size_bytes(),
        "sessions": states,
        "recent_operations": [
            {
                "operation_type": op.operation_type,
                "timestamp": op.timestamp.isoformat(),
                "entries_affected": op.entries_affected,
                "session_id": op.session_key,
                "details": op.details,
            }
            for op in ops_query
        ],
    }
    if session_key is not None:
        session = manager._session(session_key)
        data["session"] = session_detail(manager, session)
    return data


def session_state(manager: KVCacheManager, session: Any, capacity: int | None = None) -> dict[str, Any]:
    """The seed's ``SessionCacheState`` plus the persisted extras.

    ``session``: a ``Session`` row (model or named tuple); ``capacity``: the default
    capacity when already computed.
    """
    return {
        "session_id": session.key,
        "conversation_count": session.conversation_count,
        "turn_count": session.turn_count,
        "last_cleared_at": session.last_cleared_at.isoformat() if session.last_cleared_at else None,
        "last_snapshot_id": session.last_snapshot_id,
        "cache_size_bytes": session.cache_size_bytes,
        "capacity_bytes": session.capacity_bytes
        or (capacity if capacity is not None else manager.capacity()),
        "entry_count": session.entry_count,
        "total_clears": session.total_clears,
        "last_activity": session.last_activity.isoformat(),
        "metadata": json.loads(session.metadata or "{}"),
    }


def session_detail(manager: KVCacheManager, session: m.Session) -> dict[str, Any]:
    summary = m.Summary.get_or_none(m.Summary.session == session.id)
    usage = (
        m.TurnLog.select(
            m.TurnLog.turn_index, m.TurnLog.cache_size_bytes, m.TurnLog.cleared, m.TurnLog.clear_reason
        )
        .where(m.TurnLog.session == session.id)
        .order_by(m.TurnLog.turn_index)
        .tuples()
    )
    return {
        "message_count": m.Message.select().where(m.Message.session == session.id).count(),
        "snapshots": [s.to_dict() for s in manager.list_snapshots(session.key)],
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
            for t, b, c, r in m.rows_of(usage)
        ],
    }
