"""The cache commands on one session (clear, snapshot, restore) in the order a llama-server slot needs.

Each step that talks to the server comes before the store changes, so a server that
refuses (a bad slot id, no ``--slot-save-path``) leaves the store as it was; an unknown
session fails before any slot request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvcache_cli.errors import BadInputError

if TYPE_CHECKING:
    from kvcache_cli.services.manager import KVCacheManager
    from kvcache_cli.services.results import ClearInfo, RestoreResult, SnapshotInfo


def _server(manager: KVCacheManager) -> Any:
    if manager.llm is None:  # the CLI asks for a server whenever --slot is given
        raise BadInputError("this needs an LLM server: pass --server URL or set [llm].base_url")
    return manager.llm


def clear_session(manager: KVCacheManager, session: str, slot: int | None = None) -> ClearInfo:
    """Clear ``session``'s cache (reason Manual); with ``slot``, erase that slot first."""
    erased = None
    if slot is not None:
        # erase first: a server that refuses leaves the store untouched, and an erased
        # slot is what the clear is about anyway
        manager.active_entries(session)  # unknown session fails before any slot request
        erased = _server(manager).slot_erase(slot)  # checks the id against GET /slots
    result = manager.clear(session)
    result.slot_erased = erased
    return result


def take_snapshot(manager: KVCacheManager, session: str, slot: int | None = None) -> SnapshotInfo:
    """Snapshot ``session``'s active cache; with ``slot``, save the slot's KV cache first."""
    manager.active_entries(session)  # unknown session fails before any slot request
    slot_result = None
    if slot is not None:
        server = _server(manager)
        name = server.make_slot_filename(session, "snapshot")
        slot_result = server.slot_save(slot, name)  # checks the id against GET /slots
    return manager.snapshot(session, slot_result, slot_id=slot)


def restore_snapshot(
    manager: KVCacheManager, session: str, snapshot_id: int, slot: int | None = None
) -> RestoreResult:
    """Put snapshot ``snapshot_id`` back; with ``slot``, restore its slot file first."""
    snap = manager.get_snapshot(session, snapshot_id)
    restored_tokens = None
    if slot is not None:
        if not snap.slot_filename:
            raise BadInputError(f"snapshot {snapshot_id} has no slot file (take it with --slot)")
        restored_tokens = _server(manager).slot_restore(slot, snap.slot_filename).n_restored
    return manager.restore(session, snapshot_id, restored_tokens)
