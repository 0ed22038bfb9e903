"""llama-server slot files of deleted snapshots: delete them, or keep them listed.

A snapshot taken with ``--slot`` names a file in the server's ``--slot-save-path``
(hundreds of MB each). When ``maintain`` prunes or releases such snapshots, or ``forget``
removes a session, the file is no longer needed:

- with ``[llm] slot_save_path`` set (kvcache on the server's host), the file is deleted
  after the store's transaction commits (files cannot roll back);
- otherwise its name is recorded on the session (metadata ``slot_files_to_delete``), so
  every later ``maintain`` says how many wait and ``maintain --json`` lists them under
  ``slot_files_to_delete``; once the setting is there, the next ``maintain`` deletes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kvcache_cli.store import sessions_admin

if TYPE_CHECKING:
    from kvcache_cli.store.backend import Store


def of_sessions(store: Store, session_ids: list[int]) -> dict[int, list[str]]:
    """The slot files all snapshots of these sessions name (before they are released)."""
    out = {}
    for sid in session_ids:
        names = sorted(set(sessions_admin.snapshot_slot_files(store, sid).values()))
        if names:
            out[sid] = names
    return out


def by_snapshot(store: Store, session_id: int) -> dict[int, str]:
    """``{snapshot id: slot file}`` of a session (read before pruning)."""
    return sessions_admin.snapshot_slot_files(store, session_id)


def park(store: Store, orphaned: dict[int, list[str]], dry_run: bool) -> list[str]:
    """Record orphaned slot files as waiting (inside the caller's transaction); returns
    every waiting file name (with ``dry_run``: what would wait, nothing written)."""
    waiting = sessions_admin.waiting_slot_files(store)
    for sid, names in orphaned.items():
        merged = sorted(set(waiting.get(sid, [])) | set(names))
        if not dry_run:
            sessions_admin.set_waiting_slot_files(store, sid, merged)
        waiting[sid] = merged
    return sorted({name for names in waiting.values() for name in names})


def delete_waiting(store: Store, folder: str) -> tuple[list[str], list[str], list[str]]:
    """Delete every waiting slot file in ``folder``; returns (deleted, still waiting, notices).

    The files go first (outside any transaction), then one transaction forgets the
    names of those gone; a file that could not be deleted stays listed.
    """
    waiting = sessions_admin.waiting_slot_files(store)
    names = sorted({n for group in waiting.values() for n in group})
    base = Path(folder).expanduser()
    if names and not base.is_dir():
        return [], names, [f"slot_save_path {folder} is not a folder; {len(names)} slot files still wait"]
    deleted, notices = delete_files(folder, names)
    # deleted now, or already gone from the folder (deleted by hand)
    gone = set(deleted) | {n for n in names if _plain(n) and not (base / n).exists()}

    def work() -> None:
        for sid, group in sessions_admin.waiting_slot_files(store).items():
            left = [n for n in group if n not in gone]
            if left != group:
                sessions_admin.set_waiting_slot_files(store, sid, left)

    if gone:
        store.transaction(work)
    return deleted, sorted(set(names) - gone), notices


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
