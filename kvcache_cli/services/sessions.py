"""Managing whole sessions: list them, export a conversation, forget sessions.

``export`` writes what ``process`` reads back: exporting a session and replaying the
file into a new store stores the same messages (roles, names, contents, timestamps for
the native form). ``forget`` deletes everything of the named sessions in one
transaction (all or nothing); the slot files their snapshots name are deleted after it
commits when ``[llm] slot_save_path`` is set, else listed for the operator and kept
waiting, so ``maintain`` lists them until the folder is known (``services.slot_files``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from kvcache_cli.errors import BadInputError, NotFoundError
from kvcache_cli.services import slot_files
from kvcache_cli.store import sessions_admin
from kvcache_cli.store.migrations import utcnow
from kvcache_cli.timefmt import utc_iso

if TYPE_CHECKING:
    from kvcache_cli.store.backend import Store

EXPORT_FORMATS = ("native", "openai")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else utc_iso(value)


@dataclass
class SessionList:
    """``kvcache sessions``: the sessions, most recently active first."""

    sessions: list[sessions_admin.SessionRow] = field(default_factory=list)
    idle_over_hours: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sessions": [
                {
                    "session_id": row.key,
                    "messages": row.messages,
                    "turns": row.turns,
                    "clears": row.clears,
                    "snapshots": row.snapshots,
                    "cache_bytes": row.cache_bytes,
                    "capacity_bytes": row.capacity_bytes,
                    "cache_entries": row.entries,
                    "created_at": _iso(row.created_at),
                    "last_activity": _iso(row.last_activity),
                }
                for row in self.sessions
            ],
            "count": len(self.sessions),
            "idle_over_hours": self.idle_over_hours,
        }


def list_sessions(store: Store, idle_over_hours: float | None = None) -> SessionList:
    """Every session, or those idle for more than ``idle_over_hours``."""
    idle_before = None
    if idle_over_hours is not None:
        if not idle_over_hours >= 0:  # also refuses NaN
            raise BadInputError(f"--idle-over must be a number of hours >= 0, not {idle_over_hours}")
        idle_before = utcnow() - timedelta(hours=idle_over_hours)
    return SessionList(sessions_admin.list_rows(store, idle_before), idle_over_hours)


def _session_id(store: Store, key: str) -> int:
    sid = sessions_admin.session_id(store, key)
    if sid is None:
        raise NotFoundError(f"no session {key!r} (see `kvcache sessions`)")
    return sid


def export_session(store: Store, key: str, fmt: str = "native") -> Any:
    """The stored conversation as JSON-ready data ``process`` reads back.

    ``native``: ``{"session_id", "messages": [{"role", "content", "name"?, "timestamp"?}]}``;
    ``openai``: the bare messages list ``[{"role", "content", "name"?}]`` (no session id:
    give ``--session`` when replaying it).
    """
    if fmt not in EXPORT_FORMATS:
        raise BadInputError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    out: list[dict[str, Any]] = []
    for role, name, content, timestamp in sessions_admin.messages(store, _session_id(store, key)):
        message: dict[str, Any] = {"role": role, "content": content}
        if name:
            message["name"] = name
        if fmt == "native" and timestamp is not None:
            message["timestamp"] = utc_iso(timestamp)
        out.append(message)
    if fmt == "openai":
        return out
    return {"session_id": key, "messages": out}


@dataclass
class ForgottenSession:
    """What forgetting one session removed (or would remove)."""

    session: str
    rows: dict[str, int]
    slot_files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"session_id": self.session, "rows": self.rows, "slot_files": self.slot_files}


@dataclass
class ForgetResult:
    """``kvcache forget``: the sessions removed, their rows and their slot files."""

    dry_run: bool
    sessions: list[ForgottenSession] = field(default_factory=list)
    slot_files_deleted: list[str] = field(default_factory=list)
    slot_files_to_delete: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "sessions": [s.to_dict() for s in self.sessions],
            "forgotten": 0 if self.dry_run else len(self.sessions),
            "slot_files_deleted": self.slot_files_deleted,
            "slot_files_to_delete": self.slot_files_to_delete,
        }


def plan_forget(store: Store, keys: list[str]) -> ForgetResult:
    """What ``forget`` would remove (nothing changes); an unknown session is an error."""
    result = ForgetResult(dry_run=True)
    for key in dict.fromkeys(keys):
        sid = _session_id(store, key)
        result.sessions.append(
            ForgottenSession(
                key, sessions_admin.footprint(store, sid, key), slot_files.of_session(store, sid, key)
            )
        )
    result.slot_files_to_delete = [name for s in result.sessions for name in s.slot_files]
    return result


def forget_sessions(store: Store, keys: list[str], slot_save_path: str = "") -> ForgetResult:
    """Delete everything of the sessions in one transaction (all named sessions or none).

    Counted and deleted inside the same transaction, so the counts are what went. Slot
    files are deleted after the commit (files cannot roll back) when ``slot_save_path``
    names the server's slot folder; otherwise they are returned to be deleted by hand.
    """
    result = ForgetResult(dry_run=False)

    def work() -> None:
        result.sessions = []
        for key in dict.fromkeys(keys):
            sid = _session_id(store, key)
            item = ForgottenSession(
                key, sessions_admin.footprint(store, sid, key), slot_files.of_session(store, sid, key)
            )
            sessions_admin.delete(store, sid, key)
            slot_files.keep_forgotten(store, key, item.slot_files)  # deleted below, else they wait
            result.sessions.append(item)

    store.transaction(work)
    names = [name for s in result.sessions for name in s.slot_files]
    if slot_save_path:
        deleted, waiting, result.notices = slot_files.delete_waiting(store, slot_save_path, only=names)
        result.slot_files_deleted, result.slot_files_to_delete = deleted, waiting
    else:
        result.slot_files_to_delete = names
    return result
