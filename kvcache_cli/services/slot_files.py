"""llama-server slot files kvcache no longer needs: delete them, or keep them listed.

Slot files live in the server's ``--slot-save-path`` (hundreds of MB each). kvcache
knows them from three records:

- a snapshot taken with ``--slot`` names its file on the snapshot row;
- ``kvcache serve`` records each file it saves on its session (``record_saved``);
  a newer save of the same session overwrites the same file, so it is recorded once;
- names waiting to be deleted: on the session (metadata ``slot_files_to_delete``), or,
  for a forgotten session, in one operation record (``store.slot_records``).

When they go:

- ``maintain`` pruning snapshots: the pruned snapshots' files. Files ``serve`` saved are
  not tied to one snapshot; they are the session's way back into a slot, so they stay
  while the session lives;
- ``maintain`` releasing a session idle beyond ``[maintenance] inactive_hours``: its
  snapshots' files and every file ``serve`` saved for it;
- ``forget``: every file of the session.

With ``[llm] slot_save_path`` set (kvcache on the server's host) the files are deleted
after the store's transaction commits (files cannot roll back); a file that could not
be deleted stays listed. Otherwise the names wait, every later ``maintain`` says how
many and ``maintain --json`` lists them under ``slot_files_to_delete``; once the setting
is there, the next ``maintain`` deletes them. A name ``serve`` saves again is live
again: it leaves the waiting lists.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from kvcache_cli.store import sessions_admin, slot_records
from kvcache_cli.store.migrations import utcnow

if TYPE_CHECKING:
    from kvcache_cli.store.backend import Store


def of_sessions(store: Store, session_ids: list[int]) -> dict[int, list[str]]:
    """The slot files of sessions being released: their snapshots' files (read before
    the snapshots go) and the files ``serve`` saved for them."""
    of_snapshots = sessions_admin.snapshot_slot_files_of(store, session_ids)
    saved = slot_records.saved_of_sessions(store, session_ids)
    out = {}
    for sid in session_ids:
        names = of_snapshots.get(sid, set()) | set(saved.get(sid, []))
        if names:
            out[sid] = sorted(names)
    return out


def of_idle(store: Store, idle_ids: list[int], cutoff: datetime) -> dict[int, list[str]]:
    """The slot files of sessions idle since ``cutoff``: those being released
    (``idle_ids``, see :func:`of_sessions`) and any other idle session's serve files (a
    session released while still in a slot, whose file serve saved when it moved out)."""
    ids = dict.fromkeys([*idle_ids, *slot_records.idle_with_saved(store, cutoff)])
    return of_sessions(store, list(ids))


def by_snapshot(store: Store, session_id: int) -> dict[int, str]:
    """``{snapshot id: slot file}`` of a session (read before pruning)."""
    return sessions_admin.snapshot_slot_files(store, session_id)


def of_session(store: Store, sid: int, key: str) -> list[str]:
    """Every slot file of a session about to be forgotten: its snapshots' files, those
    ``serve`` saved, those waiting on it, and those of an earlier session of that name
    that was forgotten with files still waiting."""
    names = set(sessions_admin.slot_files(store, sid))
    names.update(slot_records.saved_of(store, sid))
    names.update(slot_records.forgotten_waiting(store).get(key, []))
    return sorted(names)


def keep_forgotten(store: Store, key: str, names: list[str]) -> None:
    """Inside ``forget``'s transaction, after the session is deleted: its slot files
    wait (until deleted after the commit, or by a later ``maintain``)."""
    slot_records.set_forgotten_waiting(store, key, names, utcnow())


def saved_for(store: Store, session_key: str) -> list[str]:
    """The slot files ``serve`` saved for the session called ``session_key`` (none when it
    has no row or saved none): what a slot can be restored from."""
    sid = sessions_admin.session_id(store, session_key)
    return slot_records.saved_of(store, sid) if sid is not None else []


def record_saved(store: Store, session_key: str, name: str) -> None:
    """``serve`` saved the session's slot into ``name`` (one transaction): record it on
    the session; the name is live again, so it leaves the waiting lists. A session
    forgotten while it sat in a slot has no row left: its file waits to be deleted."""

    def work() -> None:
        sid = sessions_admin.session_id(store, session_key)
        if sid is not None:
            slot_records.lock(store, [sid])
        if sid is None:
            forgotten = slot_records.forgotten_waiting(store).get(session_key, [])
            if name not in forgotten:
                slot_records.set_forgotten_waiting(store, session_key, [*forgotten, name], utcnow())
            return
        saved = slot_records.saved_of(store, sid)
        if name not in saved:
            slot_records.set_saved(store, sid, [*saved, name])
        waiting = sessions_admin.waiting_slot_files_of(store, sid)
        if name in waiting:
            sessions_admin.set_waiting_slot_files(store, sid, [n for n in waiting if n != name])
        forgotten = slot_records.forgotten_waiting(store).get(session_key, [])
        if name in forgotten:
            rest = [n for n in forgotten if n != name]
            slot_records.set_forgotten_waiting(store, session_key, rest, utcnow())

    store.transaction(work)


def park(store: Store, orphaned: dict[int, list[str]], dry_run: bool) -> list[str]:
    """Record orphaned slot files as waiting (inside the caller's transaction); returns
    every waiting file name (with ``dry_run``: what would wait, nothing written)."""
    if not dry_run:
        slot_records.lock(store, list(orphaned))
    waiting = sessions_admin.waiting_slot_files(store)
    for sid, names in orphaned.items():
        merged = sorted(set(waiting.get(sid, [])) | set(names))
        if not dry_run:
            sessions_admin.set_waiting_slot_files(store, sid, merged)
            saved = slot_records.saved_of(store, sid)
            if set(saved) & set(names):  # a released session's serve files now wait
                slot_records.set_saved(store, sid, [n for n in saved if n not in names])
        waiting[sid] = merged
    names_waiting = {name for names in waiting.values() for name in names}
    names_waiting.update(n for names in slot_records.forgotten_waiting(store).values() for n in names)
    return sorted(names_waiting)


def delete_waiting(
    store: Store, folder: str, only: list[str] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """Delete the waiting slot files (or those of them in ``only``) in ``folder``;
    returns (deleted, still waiting, notices).

    The files go first (outside any transaction), then one transaction forgets the
    names of those gone; a file that could not be deleted stays listed.
    """
    on_sessions = sessions_admin.waiting_slot_files(store)
    forgotten = slot_records.forgotten_waiting(store)
    names = {n for group in on_sessions.values() for n in group}
    names.update(n for group in forgotten.values() for n in group)
    if only is not None:
        names &= set(only)
    todo = sorted(names)
    base = Path(folder).expanduser()
    if todo and not base.is_dir():
        return [], todo, [f"slot_save_path {folder} is not a folder; {len(todo)} slot files still wait"]
    deleted, notices = delete_files(folder, todo)
    # deleted now, or already gone from the folder (deleted by hand)
    gone = set(deleted) | {n for n in todo if _plain(n) and not (base / n).exists()}

    def work() -> None:
        slot_records.lock(store, list(sessions_admin.waiting_slot_files(store)))
        for sid, group in sessions_admin.waiting_slot_files(store).items():
            left = [n for n in group if n not in gone]
            if left != group:
                sessions_admin.set_waiting_slot_files(store, sid, left)
        for key, group in slot_records.forgotten_waiting(store).items():
            left = [n for n in group if n not in gone]
            if left != group:
                slot_records.set_forgotten_waiting(store, key, left, utcnow())

    if gone:
        store.transaction(work)
    return deleted, sorted(set(todo) - gone), notices


def _plain(name: str) -> bool:
    """A bare file name: no folder part, not ``.`` or ``..``."""
    return bool(name) and name == Path(name).name and name not in (".", "..")


def delete_files(folder: str, names: list[str]) -> tuple[list[str], list[str]]:
    """Delete the slot files ``names`` inside ``folder``; returns (deleted, notices).

    Only bare file names are touched (a name with a folder part or ``..`` is refused);
    a file already gone is not an error.
    """
    base = Path(folder).expanduser()
    deleted: list[str] = []
    notices: list[str] = []
    for name in names:
        if not _plain(name):
            notices.append(f"slot file {name!r} is not a plain file name; left alone")
            continue
        try:
            (base / name).unlink()
            deleted.append(name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            notices.append(f"could not delete slot file {base / name}: {exc.strerror}")
    return deleted, notices
