"""``KVCacheManager``: the library's one object for a store, over the services.

Each method is one service call (``turns``, ``cache_ops``, ``retrieve``,
``maintain``, ``stats``) on the manager's shared run state (``core.Core``): the
config, the LLM client, the notices and the per-run caches. Every turn is one
transaction: the turn's messages, cache entries, clear, snapshot, summary,
statistics and operation records commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvcache_cli.engine.entries import ChatMessage, KVEntry
from kvcache_cli.engine.turn import should_retrieve, split_turns
from kvcache_cli.loaders import Conversation
from kvcache_cli.retrieval.fusion import RetrievalResult
from kvcache_cli.services.core import Core
from kvcache_cli.services.results import (
    ClearInfo,
    MaintenanceResult,
    ProcessResult,
    RestoreResult,
    SnapshotInfo,
    TurnOutcome,
    TurnReport,
)
from kvcache_cli.store import cache

# Each method imports its service module when first called: a command pays only for
# the services it uses (``stats`` never loads the turn engine's retrieval modules).

__all__ = [
    "ClearInfo",
    "KVCacheManager",
    "MaintenanceResult",
    "ProcessResult",
    "RestoreResult",
    "SnapshotInfo",
    "TurnOutcome",
    "TurnReport",
    "should_retrieve",
    "split_turns",
]


class KVCacheManager(Core):
    """Process turns, clear, retrieve, snapshot, restore, maintain and report on one store."""

    # -------------------------------------------------------------- turns
    def check_prefix(self, session_key: str, messages: list[ChatMessage], label: str) -> int:
        """How many of ``messages`` are stored already; refuse a history that diverges."""
        from kvcache_cli.services import turns

        return turns.check_prefix(self, session_key, messages, label)

    def process_conversation(
        self, conv: Conversation, session_key: str, on_turn: Callable[[int, int], None] | None = None
    ) -> ProcessResult:
        """Replay a conversation turn by turn; already stored turns are skipped."""
        from kvcache_cli.services import turns

        return turns.process_conversation(self, conv, session_key, on_turn)

    def begin_turn(self, session_key: str, messages: list[ChatMessage]) -> TurnOutcome:
        """Store a live request's new messages (the whole history through the new user
        message) and decide its turn; see ``services.turns.begin_turn``."""
        from kvcache_cli.services import turns

        return turns.begin_turn(self, session_key, messages)

    def finish_turn(self, session_key: str, reply: list[ChatMessage]) -> int:
        """Store a live turn's complete reply (one transaction); how many were stored."""
        from kvcache_cli.services import turns

        return turns.finish_turn(self, session_key, reply)

    def replace_reply(self, session_key: str, reply: list[ChatMessage]) -> int:
        """Regenerate: replace the messages after the last user message; how many were dropped."""
        from kvcache_cli.services import turns

        return turns.replace_reply(self, session_key, reply)

    def branch_session(self, source_key: str, new_key: str, n_messages: int) -> ProcessResult:
        """Edit: a new session replaying the first ``n_messages`` of another."""
        from kvcache_cli.services import turns

        return turns.branch_session(self, source_key, new_key, n_messages)

    # -------------------------------------------------------------- cache operations
    def clear(self, session_key: str, reason: str = "Manual") -> ClearInfo:
        """Clear a session's cache now, keeping its important entries, with a summary."""
        from kvcache_cli.services import cache_ops

        return cache_ops.clear(self, session_key, reason)

    def snapshot(self, session_key: str, slot: Any = None, slot_id: int | None = None) -> SnapshotInfo:
        """Snapshot the session's active cache now (with the server slot file saved, if any)."""
        from kvcache_cli.services import cache_ops

        return cache_ops.snapshot(self, session_key, slot, slot_id)

    def list_snapshots(self, session_key: str | None = None) -> list[SnapshotInfo]:
        from kvcache_cli.services import cache_ops

        return cache_ops.list_snapshots(self, session_key)

    def get_snapshot(self, session_key: str, snapshot_id: int) -> SnapshotInfo:
        from kvcache_cli.services import cache_ops

        return cache_ops.get_snapshot(self, session_key, snapshot_id)

    def restore(
        self, session_key: str, snapshot_id: int, slot_n_restored: int | None = None
    ) -> RestoreResult:
        """Replace the active cache with a snapshot's entries, after checking its hash."""
        from kvcache_cli.services import cache_ops

        return cache_ops.restore(self, session_key, snapshot_id, slot_n_restored)

    def active_entries(self, session_key: str) -> list[KVEntry]:
        """The session's active cache (NotFoundError for an unknown session)."""
        return cache.active_entries(self.store, self.session(session_key).get_id())

    # -------------------------------------------------------------- retrieval
    def retrieve(
        self,
        session_key: str | None,
        query: str,
        tiers: tuple[int, ...] = (1, 2, 3),
        limit: int = 10,
        min_score: float = 0.0,
        progress: Callable[[str], None] | None = None,
    ) -> RetrievalResult:
        """Ranked context for ``query`` from one session's tiers, or every session's history
        (``progress``: told before a long wait, such as embedding the session first)."""
        from kvcache_cli.services import retrieve

        return retrieve.retrieve(self, session_key, query, tiers, limit, min_score, progress)

    # -------------------------------------------------------------- maintenance and reports
    def maintain(
        self, dry_run: bool = False, inactive_hours: float | None = None, check: bool = False
    ) -> MaintenanceResult:
        """Release idle sessions' caches and snapshots, prune snapshots, trim history."""
        from kvcache_cli.services import maintain

        return maintain.maintain(self.store, self.config, dry_run, inactive_hours, check)

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check`` (SQLite) or ``ok`` when PostgreSQL answers."""
        from kvcache_cli.services import maintain

        return maintain.integrity_check(self.store)

    def statistics(self, session_key: str | None = None, history: int = 10) -> dict[str, Any]:
        """The statistics export, the session states and recent operations."""
        from kvcache_cli.services import stats

        return stats.statistics(self, session_key, history)
