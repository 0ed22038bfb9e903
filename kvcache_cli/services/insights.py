"""What an operator wants from ``kvcache stats`` at a glance, computed from the store.

Library level (no Rich): operations per hour over the last day by type, how full each
session's cache is against the memory threshold, the top sessions by size and by
clears, and whether maintenance keeps up. Every query is an indexed range or a narrow
scan of the ``sessions`` table, so this stays fast on a large store (100k operations).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from kvcache_cli.config import Config
from kvcache_cli.engine.memory import capacity_bytes
from kvcache_cli.store import models as m
from kvcache_cli.store import reports
from kvcache_cli.store.connection import Store
from kvcache_cli.store.migrations import utcnow
from kvcache_cli.timefmt import utc_iso

#: A session is "near" its memory threshold from this fraction of it on.
NEAR_FRACTION = 0.8
#: Operation types always given a series (others appear when they occur).
OPERATION_TYPES = ("clear", "retrieve", "snapshot", "restore")
HOUR = timedelta(hours=1)


def threshold_state(fill: float, threshold: float) -> str:
    """``over`` at or above the memory threshold, ``near`` from 80 % of it, else ``below``."""
    if threshold <= 0:
        return "below"
    if fill >= threshold:
        return "over"
    if fill >= threshold * NEAR_FRACTION:
        return "near"
    return "below"


def _hour_floor(when: datetime) -> datetime:
    return when.replace(minute=0, second=0, microsecond=0)


def operations_per_hour(store: Store, now: datetime | None = None, hours: int = 24) -> dict[str, Any]:
    """Operation counts per hour for the last ``hours`` hours (the current hour last).

    Grouped in SQL by the hour prefix of the timestamp over the indexed time range.
    """
    end = _hour_floor(now or utcnow()) + HOUR
    start = end - hours * HOUR
    rows = reports.operations_by_hour(store, start, end)
    series: dict[str, list[int]] = {kind: [0] * hours for kind in OPERATION_TYPES}
    for kind, hour_text, count in rows:
        try:
            when = datetime.strptime(str(hour_text)[:13], "%Y-%m-%d %H")
        except ValueError:
            continue
        index = int((when - start) / HOUR)
        if 0 <= index < hours:
            series.setdefault(str(kind), [0] * hours)[index] += int(count)
    return {
        "start": utc_iso(start),
        "end": utc_iso(end),
        "hours": hours,
        "series": series,
        "totals": {kind: sum(values) for kind, values in series.items()},
    }


def compute(
    store: Store, config: Config, now: datetime | None = None, hours: int = 24, top: int = 5
) -> dict[str, Any]:
    """The ``insights`` block of ``kvcache stats --json`` (and what the charts draw).

    ``now`` (naive UTC) fixes the end of the time window, for tests and replays.
    """
    now = now or utcnow()
    threshold = config.cache.memory_threshold_percent
    default_capacity = capacity_bytes(config.model, config.cache)
    rows = reports.session_fill_rows(store)
    sessions: list[dict[str, Any]] = []
    idle_cutoff = now - timedelta(hours=config.maintenance.inactive_hours)
    overdue: list[tuple[str, datetime]] = []
    for key, used, capacity, clears, entries, last_activity in rows:
        capacity = capacity or default_capacity
        fill = used / capacity if capacity > 0 else 0.0
        sessions.append(
            {
                "session_id": key,
                "cache_size_bytes": used,
                "capacity_bytes": capacity,
                "fill": round(fill, 4),
                "threshold_state": threshold_state(fill, threshold),
                "total_clears": clears,
            }
        )
        if entries > 0 and last_activity is not None and last_activity < idle_cutoff:
            overdue.append((key, last_activity))
    by_fill = sorted(sessions, key=lambda s: (-s["fill"], s["session_id"]))
    by_size = sorted(sessions, key=lambda s: (-s["cache_size_bytes"], s["session_id"]))[:top]
    by_clears = sorted(
        (s for s in sessions if s["total_clears"] > 0), key=lambda s: (-s["total_clears"], s["session_id"])
    )[:top]
    states = {
        name: sum(1 for s in sessions if s["threshold_state"] == name) for name in ("below", "near", "over")
    }
    op_count = reports.count(store, m.Operation)
    limit = config.maintenance.history_limit
    oldest = min((when for _, when in overdue), default=None)
    return {
        "generated_at": utc_iso(now),
        "memory_threshold_percent": threshold,
        "near_fraction": NEAR_FRACTION,
        "threshold_states": states,
        "sessions_by_fill": by_fill,
        "top_by_size": by_size,
        "top_by_clears": by_clears,
        "operations_per_hour": operations_per_hour(store, now, hours),
        "maintenance": {
            "inactive_hours": config.maintenance.inactive_hours,
            "overdue_sessions": [key for key, _ in sorted(overdue, key=lambda item: item[1])],
            "oldest_idle_hours": None if oldest is None else round((now - oldest).total_seconds() / 3600, 1),
            "operation_history_count": op_count,
            "history_limit": limit,
            "history_over_limit": op_count > limit,
            "keeps_up": not overdue and op_count <= limit,
        },
    }
