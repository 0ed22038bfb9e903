"""Result types of the manager's operations, each with a stable ``to_dict`` for ``--json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kvcache_cli.engine.entries import KVEntry
from kvcache_cli.retrieval.fusion import RetrievedEntry
from kvcache_cli.timefmt import utc_iso


@dataclass
class ClearInfo:
    """One clear: what was cleared and preserved, the snapshot and summary it made."""

    session_id: str
    turn: int
    reason: str
    entries_cleared: int
    entries_preserved: int
    preserved_keywords: list[str]
    snapshot_id: int | None
    summary_source: str | None
    bridge_message: str
    cache_size_bytes_before: int = 0
    slot_erased: int | None = None
    kept_keys: set[str] = field(default_factory=set, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "turn": self.turn,
            "clear_reason": self.reason,
            "entries_cleared": self.entries_cleared,
            "entries_preserved": self.entries_preserved,
            "preserved_keywords": self.preserved_keywords,
            "snapshot_id": self.snapshot_id,
            "summary_source": self.summary_source,
            "cache_size_bytes_before": self.cache_size_bytes_before,
            "bridge_message": self.bridge_message,
            "slot_erased": self.slot_erased,
        }


@dataclass
class TurnReport:
    """What one processed turn did."""

    turn: int
    message_index: int
    conversation_count: int
    cache_size_bytes: int
    entry_count: int
    clear: ClearInfo | None = None
    snapshot_ids: list[int] = field(default_factory=list)
    retrieved: int = 0
    retrieval_tiers: list[int] = field(default_factory=list)
    bridge_messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "message_index": self.message_index,
            "conversation_count": self.conversation_count,
            "cache_size_bytes": self.cache_size_bytes,
            "entry_count": self.entry_count,
            "cleared": self.clear is not None,
            "clear_reason": self.clear.reason if self.clear else None,
            "snapshot_ids": self.snapshot_ids,
            "entries_retrieved": self.retrieved,
            "tiers_searched": self.retrieval_tiers,
            "bridge_messages": self.bridge_messages,
        }


@dataclass
class TurnOutcome:
    """A live turn's decision and what a prompt builder needs (``begin_turn``).

    ``report`` is None when the request held no new user message. ``retrieved`` are the
    entries retrieval found for the question (role, text, message_index, score, tier);
    ``summary`` is the session's cumulative summary text (None before any clear);
    ``active`` the active cache after the decision (after a clear: the preserved
    entries and what came later); ``context_start`` the index of the message where the
    context since the last clear starts (0 when never cleared).
    """

    session_id: str
    report: TurnReport | None = None
    retrieved: list[RetrievedEntry] = field(default_factory=list)
    summary: str | None = None
    active: list[KVEntry] = field(default_factory=list)
    context_start: int = 0
    messages_stored: int = 0
    notices: list[str] = field(default_factory=list)

    @property
    def clear(self) -> ClearInfo | None:
        """The clear this turn made, if any."""
        return self.report.clear if self.report is not None else None

    @property
    def bridge_messages(self) -> list[str]:
        return self.report.bridge_messages if self.report is not None else []


@dataclass
class ProcessResult:
    """A conversation's replay: per-turn reports and totals."""

    session_id: str
    source: str
    messages_total: int = 0
    messages_added: int = 0
    turns: list[TurnReport] = field(default_factory=list)
    capacity_bytes: int = 0
    notices: list[str] = field(default_factory=list)

    @property
    def clears(self) -> list[ClearInfo]:
        return [t.clear for t in self.turns if t.clear]

    @property
    def snapshot_ids(self) -> list[int]:
        return [s for t in self.turns for s in t.snapshot_ids]

    # the totals ``to_dict`` reports, as attributes of the same names
    @property
    def turns_processed(self) -> int:
        return len(self.turns)

    @property
    def total_clears(self) -> int:
        return len(self.clears)

    @property
    def entries_cleared(self) -> int:
        return sum(c.entries_cleared for c in self.clears)

    @property
    def entries_preserved(self) -> int:
        return sum(c.entries_preserved for c in self.clears)

    @property
    def total_retrievals(self) -> int:
        return sum(1 for t in self.turns if t.retrieval_tiers)

    @property
    def entries_retrieved(self) -> int:
        return sum(t.retrieved for t in self.turns)

    @property
    def snapshots_created(self) -> int:
        return len(self.snapshot_ids)

    @property
    def usage(self) -> list[int]:
        """Cache bytes after each turn."""
        return [t.cache_size_bytes for t in self.turns]

    def to_dict(self, with_turns: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "session_id": self.session_id,
            "source": self.source,
            "messages_total": self.messages_total,
            "messages_added": self.messages_added,
            "turns_processed": self.turns_processed,
            "total_clears": self.total_clears,
            "entries_cleared": self.entries_cleared,
            "entries_preserved": self.entries_preserved,
            "total_retrievals": self.total_retrievals,
            "entries_retrieved": self.entries_retrieved,
            "snapshots_created": self.snapshots_created,
            "capacity_bytes": self.capacity_bytes,
            "clears": [c.to_dict() for c in self.clears],
            "usage": self.usage,
            "notices": self.notices,
        }
        if with_turns:
            data["turns"] = [t.to_dict() for t in self.turns]
        return data


@dataclass
class SnapshotInfo:
    """A snapshot as listed and returned by ``snapshot``."""

    id: int
    session_id: str
    snapshot_type: str
    reason: str
    entry_count: int
    size_bytes: int
    state_hash: str
    created_at: datetime
    turn_index: int
    slot_id: int | None = None
    slot_filename: str | None = None
    slot_n_saved: int | None = None
    slot_n_written: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "session_id": self.session_id,
            "snapshot_type": self.snapshot_type,
            "reason": self.reason,
            "entry_count": self.entry_count,
            "size_bytes": self.size_bytes,
            "state_hash": self.state_hash,
            "created_at": utc_iso(self.created_at),
            "turn_index": self.turn_index,
            "slot_id": self.slot_id,
            "slot_filename": self.slot_filename,
            "slot_n_saved": self.slot_n_saved,
            "slot_n_written": self.slot_n_written,
        }


@dataclass
class RestoreResult:
    session_id: str
    snapshot_id: int
    entries_restored: int
    cache_size_bytes: int
    bridge_message: str
    slot_n_restored: int | None = None
    entries_before: int = 0
    cache_bytes_before: int = 0
    mode: str = "replace"  # the snapshot replaces the active cache (see ``cache_ops.restore``)

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "snapshot_id": self.snapshot_id,
            "mode": self.mode,
            "entries_before": self.entries_before,
            "entries_after": self.entries_restored,
            "cache_bytes_before": self.cache_bytes_before,
            "cache_bytes_after": self.cache_size_bytes,
            "entries_restored": self.entries_restored,
            "cache_size_bytes": self.cache_size_bytes,
            "bridge_message": self.bridge_message,
            "slot_n_restored": self.slot_n_restored,
        }


@dataclass
class MaintenanceResult:
    """What a maintenance run did (or would do)."""

    dry_run: bool
    sessions_cleaned: int = 0
    snapshots_pruned: int = 0
    operations_trimmed: int = 0
    cleaned_sessions: list[str] = field(default_factory=list)
    pruned_snapshot_ids: list[int] = field(default_factory=list)
    integrity: str | None = None
    errors: list[str] = field(default_factory=list)
    slot_files_deleted: list[str] = field(default_factory=list)
    slot_files_to_delete: list[str] = field(default_factory=list)  # waiting: no slot_save_path

    @property
    def did_anything(self) -> bool:
        return bool(
            self.sessions_cleaned
            or self.snapshots_pruned
            or self.operations_trimmed
            or self.slot_files_deleted
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "sessions_cleaned": self.sessions_cleaned,
            "snapshots_pruned": self.snapshots_pruned,
            "operations_trimmed": self.operations_trimmed,
            "cleaned_sessions": self.cleaned_sessions,
            "pruned_snapshot_ids": self.pruned_snapshot_ids,
            "integrity": self.integrity,
            "errors": self.errors,
            "slot_files_deleted": self.slot_files_deleted,
            "slot_files_to_delete": self.slot_files_to_delete,
        }
