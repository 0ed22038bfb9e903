"""Cache operations: clear (keeping the important entries), snapshot, list, restore.

``clear_in_turn`` and ``take_snapshot`` run inside a caller's transaction (a turn's
clear and interval snapshot); ``clear``, ``snapshot`` and ``restore`` are the commands'
operations, each one transaction.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from kvcache_cli.engine import bridge
from kvcache_cli.engine.entries import KVEntry, entries_hash
from kvcache_cli.engine.turn import (
    entries_to_keep,
    periodic_snapshot_due,
    snapshot_content,
    snapshot_on_clear,
)
from kvcache_cli.errors import IntegrityError, NotFoundError
from kvcache_cli.services import summaries
from kvcache_cli.services.core import Core
from kvcache_cli.services.results import ClearInfo, RestoreResult, SnapshotInfo
from kvcache_cli.store import cache, counters, sessions, snapshots
from kvcache_cli.store import models as m
from kvcache_cli.store.migrations import utcnow


# ----------------------------------------------------------------------------- clear
def clear_in_turn(
    core: Core,
    session: m.Session,
    active: list[KVEntry],
    reason: str,
    now: datetime,
    turn: int,
    upto: int | None = None,
) -> ClearInfo:
    """Clear the active cache, keeping the important entries (inside the caller's transaction).

    ``upto``: the summary covers the messages before this index (``summaries.write``).
    """
    cfg = core.config.cache
    store = core.store
    engagement = cache.engagement(store, session.get_id())
    preserved = entries_to_keep(active, core.scorer, now, engagement, cfg, core.capacity())
    kept_keys = {p.entry.key_hash for p in preserved}
    snapshot_id = None
    if snapshot_on_clear(cfg, reason):
        snapshot_id = take_snapshot(core, session, active, f"clear:{reason}", now, turn)
    keywords = [k for p in preserved for k in p.keywords][:10]
    text, source = summaries.write(core, session, now, upto)
    cleared = len(active) - len(preserved)
    message = bridge.summary_now(text) if text else bridge.clear_bridge(cleared, len(preserved), keywords)
    before = sum(e.size_bytes for e in active)
    cache.keep_only(store, session.get_id(), sorted(kept_keys))
    kept_entries = [p.entry for p in preserved]
    counters.bump(store, now, total_clears=1, entries_preserved=len(preserved), entries_cleared=cleared)
    counters.record(store, session.key, "clear", len(active), reason, now)
    session.conversation_count = 0
    session.last_cleared_at = now
    session.total_clears += 1
    session.entry_count = len(kept_entries)
    session.cache_size_bytes = sum(e.size_bytes for e in kept_entries)
    if snapshot_id is not None:
        session.last_snapshot_id = snapshot_id
    meta = json.loads(session.metadata or "{}")
    meta["last_clear_reason"] = reason
    session.metadata = json.dumps(meta, sort_keys=True)
    return ClearInfo(
        session_id=session.key,
        turn=turn,
        reason=reason,
        entries_cleared=cleared,
        entries_preserved=len(preserved),
        preserved_keywords=keywords,
        snapshot_id=snapshot_id,
        summary_source=source,
        bridge_message=message,
        cache_size_bytes_before=before,
        kept_keys=kept_keys,
    )


def clear(core: Core, session_key: str, reason: str = "Manual") -> ClearInfo:
    """Clear a session's cache now (reason ``Manual``) with preservation and summary."""

    def work() -> ClearInfo:
        now = utcnow()
        session = core.session_for_update(session_key, create=False, now=now)
        active = cache.active_entries(core.store, session.get_id())
        info = clear_in_turn(core, session, active, reason, now, turn=session.turn_count)
        session.last_activity = now
        sessions.save(core.store, session)
        return info

    summaries.prepare(core, session_key, [])  # the LLM call runs before the write lock
    return core.store.transaction(work)


# ----------------------------------------------------------------------------- snapshots
def interval_snapshot(core: Core, session: m.Session, active: list[KVEntry], now: datetime) -> int | None:
    """The strategy's every-N-turns snapshot, when this turn is due one."""
    if not periodic_snapshot_due(core.config.cache, session.turn_count, bool(active)):
        return None
    return take_snapshot(core, session, active, "interval", now, session.turn_count)


def take_snapshot(
    core: Core, session: m.Session, entries: list[KVEntry], reason: str, now: datetime, turn: int
) -> int | None:
    """Store a self-contained snapshot; de-duplicated by hash; pruned to the max."""
    snap = core.config.cache.snapshot
    content = snapshot_content(snap, entries)
    if content is None:
        return None
    kind, entries = content
    state_hash = entries_hash(entries)
    if reason == "interval" and snapshots.last_hash(core.store, session.get_id()) == state_hash:
        return None
    row = store_snapshot(core, session, entries, kind, reason, turn, state_hash, now)
    if snap.max_snapshots > 0:
        snapshots.prune(core.store, session.get_id(), snap.max_snapshots, dry_run=False)
    return int(row.id)


def store_snapshot(
    core: Core,
    session: m.Session,
    entries: list[KVEntry],
    kind: str,
    reason: str,
    turn: int,
    state_hash: str,
    now: datetime,
) -> m.Snapshot:
    """Insert a snapshot and its entries, count it and record the operation."""
    values: dict[str, Any] = {
        "id": snapshots.next_id(core.store),
        "session": session.id,
        "turn_index": turn,
        "snapshot_type": kind,
        "reason": reason,
        "state_hash": state_hash,
        "entry_count": len(entries),
        "size_bytes": sum(e.size_bytes for e in entries),
        "created_at": now,
    }
    row = snapshots.insert(core.store, values, entries)
    counters.bump(core.store, now, total_snapshots=1)
    counters.record(core.store, session.key, "snapshot", len(entries), f"Snapshot ID: {row.id}", now)
    session.last_snapshot_id = row.id
    return row


def snapshot(core: Core, session_key: str, slot: Any = None, slot_id: int | None = None) -> SnapshotInfo:
    """Snapshot the session's active cache now (type ``full``, reason ``manual``).

    ``slot`` is the server's ``SlotSaveResult`` of ``snapshot --slot``, ``slot_id`` the
    slot it was saved from (the result itself does not carry the id).
    """

    def work() -> SnapshotInfo:
        now = utcnow()
        session = core.session_for_update(session_key, create=False, now=now)
        active = cache.active_entries(core.store, session.get_id())
        row = store_snapshot(
            core, session, active, "full", "manual", session.turn_count, entries_hash(active), now
        )
        if slot is not None:
            row.slot_id = slot_id if slot_id is not None else getattr(slot, "slot_id", None)
            row.slot_filename = slot.filename
            row.slot_n_saved = slot.n_saved
            row.slot_n_written = slot.n_written
            snapshots.set_slot(
                core.store, row.id, row.slot_id, row.slot_filename, row.slot_n_saved, row.slot_n_written
            )
        session.last_activity = now
        sessions.save(core.store, session)
        return snapshot_info(row, session.key)

    return core.store.transaction(work)


def snapshot_info(row: Any, session_key: str) -> SnapshotInfo:
    return SnapshotInfo(
        id=row.id,
        session_id=session_key,
        snapshot_type=row.snapshot_type,
        reason=row.reason,
        entry_count=row.entry_count,
        size_bytes=row.size_bytes,
        state_hash=row.state_hash,
        created_at=row.created_at,
        turn_index=row.turn_index,
        slot_id=row.slot_id,
        slot_filename=row.slot_filename,
        slot_n_saved=row.slot_n_saved,
        slot_n_written=row.slot_n_written,
    )


def list_snapshots(core: Core, session_key: str | None = None) -> list[SnapshotInfo]:
    """One session's snapshots (or every session's), by session and age."""
    session_id = core.session(session_key).get_id() if session_key is not None else None
    return [snapshot_info(row, key) for row, key in snapshots.listed(core.store, session_id)]


def get_snapshot(core: Core, session_key: str, snapshot_id: int) -> SnapshotInfo:
    session = core.session(session_key)
    row = snapshots.get(core.store, session.get_id(), snapshot_id)
    if row is None:
        raise NotFoundError(f"unknown snapshot {snapshot_id} for session {session_key!r}")
    return snapshot_info(row, session_key)


def cached_snapshot_entries(core: Core, snapshot_id: int, state_hash: str) -> list[KVEntry]:
    """A snapshot's entries for tier-2 search, kept per (id, hash): snapshots never change.

    Callers must not modify the returned entries. ``restore`` reads the store itself.
    """
    key = (int(snapshot_id), state_hash)
    kept = core.snapshot_cache
    entries: list[KVEntry] | None = kept.get(key)
    if entries is None:
        entries = snapshots.entries(core.store, snapshot_id)
        if len(kept) >= 64:
            kept.pop(next(iter(kept)))
        kept[key] = entries
    return entries


def restore(
    core: Core, session_key: str, snapshot_id: int, slot_n_restored: int | None = None
) -> RestoreResult:
    """Replace the active cache with a snapshot's entries, after checking its hash.

    Replace, not merge: the active cache mirrors the model's KV cache, and restoring a
    llama-server slot file (``restore --slot``) replaces the slot's whole context too.
    The result carries the counts before and after.
    """

    def work() -> RestoreResult:
        now = utcnow()
        session = core.session_for_update(session_key, create=False, now=now)
        row = snapshots.get(core.store, session.get_id(), snapshot_id)
        if row is None:
            raise NotFoundError(f"unknown snapshot {snapshot_id} for session {session_key!r}")
        entries = snapshots.entries(core.store, row.id)
        if entries_hash(entries) != row.state_hash or len(entries) != row.entry_count:
            raise IntegrityError(
                f"snapshot {snapshot_id} of session {session_key!r} failed its integrity check"
            )
        before_entries, before_bytes = session.entry_count, session.cache_size_bytes
        cache.keep_only(core.store, session.get_id(), [])
        cache.add_entries(core.store, session.get_id(), entries, 0)
        age = int((now - row.created_at).total_seconds() // 60)
        message = bridge.restore_bridge(len(entries), max(age, 0), replaced=before_entries)
        counters.bump(core.store, now, total_restores=1)
        counters.record(core.store, session.key, "restore", len(entries), f"Snapshot ID: {row.id}", now)
        session.entry_count = len(entries)
        session.cache_size_bytes = sum(e.size_bytes for e in entries)
        session.last_snapshot_id = row.id
        session.last_activity = now
        sessions.save(core.store, session)
        return RestoreResult(
            session.key,
            row.id,
            len(entries),
            session.cache_size_bytes,
            message,
            slot_n_restored,
            entries_before=before_entries,
            cache_bytes_before=before_bytes,
        )

    return core.store.transaction(work)
