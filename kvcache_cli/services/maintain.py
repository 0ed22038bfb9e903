"""Maintenance for cron: release idle sessions, prune snapshots, trim history, check.

Runs under the store's maintenance lock (``Store.exclusive``), so two runs (on one host
or, with PostgreSQL, on several) never prune together.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from kvcache_cli.services.results import MaintenanceResult
from kvcache_cli.store import models as m
from kvcache_cli.store.migrations import utcnow

if TYPE_CHECKING:
    from kvcache_cli.services.manager import KVCacheManager
    from kvcache_cli.store.backend import Store


def maintain(
    manager: KVCacheManager,
    dry_run: bool = False,
    inactive_hours: float | None = None,
    check: bool = False,
) -> MaintenanceResult:
    """Release idle sessions' caches and snapshots, prune snapshots, trim history.

    A session is idle when its last activity is older than ``inactive_hours``
    (default from the config, 24 h); its messages, summary and statistics stay, so
    tier-3 retrieval keeps working. Holds the store's maintenance lock.
    """

    hours = manager.config.maintenance.inactive_hours if inactive_hours is None else inactive_hours
    result = MaintenanceResult(dry_run=dry_run)
    with manager.store.exclusive("maintain"):
        if check:
            result.integrity = integrity_check(manager.store)

        def work() -> None:
            cutoff = utcnow() - timedelta(hours=hours)
            idle = (
                m.Session.select(m.Session.id, m.Session.key)
                .where(
                    (m.Session.last_activity < cutoff) & ((m.Session.entry_count > 0) | fn_exists_snapshot())
                )
                .order_by(m.Session.key)
                .tuples()
            )
            idle_ids: list[int] = []
            for session_id, key in m.rows_of(idle):
                result.cleaned_sessions.append(key)
                idle_ids.append(int(session_id))
            if not dry_run:
                # set-based, 500 sessions per statement (thousands of idle sessions
                # would otherwise cost five statements each)
                for lo in range(0, len(idle_ids), 500):
                    part = idle_ids[lo : lo + 500]
                    marks = ", ".join("?" * len(part))
                    for statement in (
                        "DELETE FROM snapshot_entries WHERE snapshot_id IN "
                        f"(SELECT id FROM snapshots WHERE session_id IN ({marks}))",
                        f"DELETE FROM snapshots WHERE session_id IN ({marks})",
                        f"DELETE FROM cache_entries WHERE session_id IN ({marks})",
                        "UPDATE sessions SET entry_count = 0, cache_size_bytes = 0, "
                        f"last_snapshot_id = NULL WHERE id IN ({marks})",
                    ):
                        manager.store.query(statement, part)
            result.sessions_cleaned = len(result.cleaned_sessions)
            keep = manager.config.cache.snapshot.max_snapshots
            if keep > 0:
                idle_keys = set(result.cleaned_sessions)
                crowded = (
                    m.Snapshot.select(m.Snapshot.session, m.Session.key)
                    .join(m.Session)
                    .group_by(m.Snapshot.session, m.Session.key)
                    .having(fn_count() > keep)
                    .tuples()
                )
                for session_id, key in m.rows_of(crowded):
                    if key in idle_keys:
                        continue
                    result.pruned_snapshot_ids += manager._prune_session_snapshots(session_id, keep, dry_run)
            result.snapshots_pruned = len(result.pruned_snapshot_ids)
            limit = manager.config.maintenance.history_limit
            total = m.Operation.select().count()
            if total > limit:
                result.operations_trimmed = total - limit
                if not dry_run:
                    boundary = (
                        m.Operation.select(m.Operation.id)
                        .order_by(m.Operation.id.desc())
                        .offset(limit - 1)
                        .limit(1)
                        .scalar()
                    )
                    m.Operation.delete().where(m.Operation.id < boundary).execute()
            if dry_run:
                raise _DryRun

        try:
            manager.store.transaction(work)
        except _DryRun:
            pass
    return result


def integrity_check(store: Store) -> str:
    """``PRAGMA integrity_check`` (SQLite) or ``ok`` when PostgreSQL answers."""
    if store.is_sqlite:
        rows = store.db.execute_sql("PRAGMA integrity_check").fetchall()
        return "; ".join(str(r[0]) for r in rows)
    store.db.execute_sql("SELECT 1").fetchone()
    return "ok"


class _DryRun(Exception):
    """Raised inside a dry-run maintenance transaction to roll it back."""


def fn_count() -> Any:
    from peewee import fn

    return fn.COUNT(m.Snapshot.id)


def fn_exists_snapshot() -> Any:
    from peewee import fn

    return fn.EXISTS(m.Snapshot.select(m.Snapshot.id).where(m.Snapshot.session == m.Session.id))
