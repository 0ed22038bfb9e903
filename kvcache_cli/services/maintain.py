"""Maintenance for cron: release idle sessions, prune snapshots, trim history, check.

Runs under the store's maintenance lock (``Store.exclusive``), so two runs (on one host
or, with PostgreSQL, on several) never prune together.
"""

from __future__ import annotations

from datetime import timedelta

from kvcache_cli.config import Config
from kvcache_cli.services import slot_files
from kvcache_cli.services.results import MaintenanceResult
from kvcache_cli.store import models as m
from kvcache_cli.store import reports, snapshots
from kvcache_cli.store.connection import Store
from kvcache_cli.store.migrations import utcnow


def maintain(
    store: Store,
    config: Config,
    dry_run: bool = False,
    inactive_hours: float | None = None,
    check: bool = False,
) -> MaintenanceResult:
    """Release idle sessions' caches and snapshots, prune snapshots, trim history.

    A session is idle when its last activity is older than ``inactive_hours``
    (default from the config, 24 h); its messages, summary and statistics stay, so
    tier-3 retrieval keeps working. Holds the store's maintenance lock.
    """
    hours = config.maintenance.inactive_hours if inactive_hours is None else inactive_hours
    result = MaintenanceResult(dry_run=dry_run)
    with store.exclusive("maintain"):
        if check:
            result.integrity = integrity_check(store)

        def work() -> None:
            cutoff = utcnow() - timedelta(hours=hours)
            idle = reports.idle_sessions(store, cutoff)
            result.cleaned_sessions = [key for _, key in idle]
            orphaned = slot_files.of_idle(store, [sid for sid, _ in idle], cutoff)  # see slot_files
            if not dry_run:
                reports.release_sessions(store, [sid for sid, _ in idle])
            result.sessions_cleaned = len(result.cleaned_sessions)
            keep = config.cache.snapshot.max_snapshots
            if keep > 0:
                idle_keys = set(result.cleaned_sessions)
                for session_id, key in reports.crowded_sessions(store, keep):
                    if key not in idle_keys:
                        files = slot_files.by_snapshot(store, session_id)
                        pruned = snapshots.prune(store, session_id, keep, dry_run)
                        result.pruned_snapshot_ids += pruned
                        names = [files[i] for i in pruned if i in files]
                        if names:
                            orphaned.setdefault(session_id, []).extend(names)
            result.snapshots_pruned = len(result.pruned_snapshot_ids)
            result.slot_files_to_delete = slot_files.park(store, orphaned, dry_run)
            limit = config.maintenance.history_limit
            total = reports.count(store, m.Operation)
            if total > limit:
                result.operations_trimmed = total - limit
                if not dry_run:
                    reports.trim_operations(store, limit)
            if dry_run:
                raise _DryRun

        try:
            store.transaction(work)
        except _DryRun:
            pass
        folder = config.llm.slot_save_path
        if folder and not dry_run and result.slot_files_to_delete:
            deleted, waiting, notices = slot_files.delete_waiting(store, folder)
            result.slot_files_deleted, result.slot_files_to_delete = deleted, waiting
            result.errors += notices
    return result


def integrity_check(store: Store) -> str:
    """``PRAGMA integrity_check`` (SQLite) or ``ok`` when PostgreSQL answers."""
    return reports.integrity_check(store)


class _DryRun(Exception):
    """Raised inside a dry-run maintenance transaction to roll it back."""
