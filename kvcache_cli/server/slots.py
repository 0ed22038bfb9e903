"""Real KV slots: each session pinned to one of the upstream's slots, swapped through files.

With ``llama-server -np N --slot-save-path DIR``, a turn of a session that no slot
holds takes the least recently used idle slot: that slot's KV is saved to its
session's file first (``action=save``), the arriving session's file, if any, is
restored into it (``action=restore``), and the request goes with ``id_slot`` and
``cache_prompt``. After a turn that cleared, the new prefix is saved at once.

A file's name carries the session's digest and the model and ``n_ctx`` it was saved
under (from ``/props``), so a file is never restored into another model or context
size. A restore is checked on the next answer's ``timings``: one whose ``cache_n``
is 0 reused nothing, and is logged and counted (``result="unused"``), not trusted.
An upstream that restarted comes back with empty slots. Before a save, ``/slots``
must show the slot holding tokens, so an empty slot never overwrites a good file; and
a session that kept its slot but finds nothing cached (``cache_n`` 0) means the same:
either way the sessions whose slots ``/slots`` shows empty are no longer taken as
resident, so their next turn restores their file. Each file saved is recorded on its
session (``services.slot_files``), so ``forget`` and ``maintain`` (for a session idle
beyond the retention) delete it, or list it when the slot folder is not known here.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvcache_cli.errors import KVCacheError
from kvcache_cli.server.metrics import Metrics
from kvcache_cli.services import slot_files

if TYPE_CHECKING:
    from kvcache_cli.store.connection import Store


def slot_file_name(session_key: str, model: str, n_ctx: int) -> str:
    """``kvcache-<session digest>-<model digest>-<n_ctx>.bin`` (a safe file name)."""
    session = hashlib.sha256(session_key.encode("utf-8")).hexdigest()[:24]
    model_tag = hashlib.sha256(model.encode("utf-8")).hexdigest()[:8]
    return f"kvcache-{session}-{model_tag}-{n_ctx}.bin"


def probe_slot_files(llm: Any) -> str | None:
    """Why slot files cannot be used on this upstream (None: they can).

    Restoring a file that does not exist answers 400 on a server started with
    ``--slot-save-path`` and 501 without it; nothing is written either way.
    """
    try:
        llm.slot_restore(0, "kvcache-probe-does-not-exist.bin")
    except KVCacheError as exc:  # by the answer's status: the message names the URL, port included
        status = getattr(exc, "status", None)
        if status == 501:
            return "the upstream has no --slot-save-path"
        if status == 400:
            return None
        return f"the upstream's slot actions failed ({str(exc)[:120]})"
    return None


@dataclass
class _Slot:
    id: int
    owner: str | None = None  # the session whose KV the slot holds
    last_used: float = 0.0
    busy: bool = False


@dataclass
class _Pending:
    slot: int
    restored: int = 0  # tokens a restore put back before this turn (0: none)
    resident: bool = False  # the slot held the session already (nothing moved in)
    cleared: bool = False
    evicted: str | None = None  # the session this turn moved out of the slot


class SlotPinning:
    """Which session each slot holds; save/restore when a session moves in."""

    def __init__(
        self,
        llm: Any,
        n_slots: int,
        n_ctx: int,
        model: str,
        metrics: Metrics,
        quiet: bool,
        store: Store | None = None,
    ) -> None:
        self.llm = llm
        self.store = store  # where each saved file is recorded (None: not recorded)
        self.n_ctx = n_ctx
        self.model = model
        self.metrics = metrics
        self.quiet = quiet
        self._slots = [_Slot(i) for i in range(n_slots)]
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self.stats: dict[str, int] = {}
        self._saves: dict[str, int] = {}  # per session: files saved, restores that took
        self._restores: dict[str, int] = {}

    def _note(self, message: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"kvcache serve: {message}\n")
            sys.stderr.flush()

    def _count(self, action: str, result: str) -> None:
        self.metrics.slot_actions.labels(action, result).inc()
        self.stats[f"{action}:{result}"] = self.stats.get(f"{action}:{result}", 0) + 1

    def file_for(self, session_key: str) -> str:
        return slot_file_name(session_key, self.model, self.n_ctx)

    # -------------------------------------------------------------- a turn
    def before_turn(self, session_key: str, plan: Any) -> None:
        """Pin ``session_key`` to a slot (swapping one out if needed); no slot free: unpinned."""
        cleared = "cleared" in getattr(plan, "action", "")
        with self._lock:
            slot = next((s for s in self._slots if s.owner == session_key and not s.busy), None)
            if slot is None:
                idle = [s for s in self._slots if not s.busy]
                if not idle:
                    return  # every slot is in a turn: this one goes unpinned
                slot = min(idle, key=lambda s: (s.owner is not None, s.last_used))
                evicted, slot.owner = slot.owner, session_key
                moving_in = True
            else:
                evicted, moving_in = None, False
            slot.busy = True
            slot.last_used = time.monotonic()
        pending = _Pending(slot.id, cleared=cleared, evicted=evicted, resident=not moving_in)
        try:
            if moving_in:
                if evicted is not None:
                    self._save(slot.id, evicted)
                pending.restored = self._restore(slot.id, session_key)
        finally:
            with self._lock:
                self._pending[session_key] = pending

    def facts(self, session_key: str) -> dict[str, Any]:
        """The operator's view of a session's slot (kept in its metadata, shown by ``stats``)."""
        with self._lock:
            slot = next((s.id for s in self._slots if s.owner == session_key), None)
            return {
                "slot": slot,
                "slot_file": self.file_for(session_key),
                "slot_saves": self._saves.get(session_key, 0),
                "slot_restores": self._restores.get(session_key, 0),
            }

    def evicted_by(self, session_key: str) -> str | None:
        """The session the current turn of ``session_key`` moved out of its slot."""
        with self._lock:
            pending = self._pending.get(session_key)
            return pending.evicted if pending is not None else None

    def request_fields(self, session_key: str) -> dict[str, Any]:
        """``id_slot`` and ``cache_prompt`` for a pinned session's request (else nothing)."""
        with self._lock:
            pending = self._pending.get(session_key)
        return {"id_slot": pending.slot, "cache_prompt": True} if pending is not None else {}

    def after_turn(self, session_key: str, timings: Any) -> None:
        """Check a restore against the answer's ``timings``; save after a clear; free the slot."""
        with self._lock:
            pending = self._pending.pop(session_key, None)
        if pending is None:
            return
        try:
            reused = int(timings.get("cache_n") or 0) > 0 if isinstance(timings, dict) else None
            if pending.restored and reused is not None:
                self._count("restore_check", "reused" if reused else "unused")
                if not reused:
                    self._note(f"slot {pending.slot}: the restore for {session_key!r} reused nothing")
            elif pending.resident and reused is False:
                # the slot lost what this session left in it: the upstream restarted
                self._count("resident_check", "lost")
                self._note(f"slot {pending.slot}: {session_key!r} found nothing cached (upstream restarted?)")
                self._forget_emptied(keep=pending.slot)
            if pending.cleared:
                self._save(pending.slot, session_key)
        finally:
            with self._lock:
                self._slots[pending.slot].busy = False

    def release(self, session_key: str) -> None:
        """A turn that ended without an answer: free its slot (the slot keeps its owner)."""
        with self._lock:
            pending = self._pending.pop(session_key, None)
            if pending is not None:
                self._slots[pending.slot].busy = False

    # -------------------------------------------------------------- actions
    def _forget_emptied(self, keep: int, infos: list[Any] | None = None) -> None:
        """Sessions in idle slots that ``/slots`` (``infos``, else read now) shows empty are
        resident no more: their next turn restores their file. Slot ``keep`` stays."""
        if infos is None:
            try:
                infos = self.llm.slots()
            except KVCacheError as exc:
                self._note(f"could not read the upstream's slots: {exc}")
                return
        holding = {s.id for s in infos if s.n_prompt_tokens}
        with self._lock:
            for slot in self._slots:
                if slot.id != keep and not slot.busy and slot.id not in holding:
                    slot.owner = None

    def _save(self, slot_id: int, owner: str) -> None:
        try:
            infos = self.llm.slots()
        except KVCacheError as exc:
            self._count("save", "failed")
            self._note(f"slot {slot_id}: not saved for {owner!r}: could not read the upstream's slots: {exc}")
            return
        info = next((s for s in infos if s.id == slot_id), None)
        if info is None or not info.n_prompt_tokens:
            # empty: the upstream restarted (or never ran this slot). Never overwrite a file with it
            self._count("save", "skipped_empty")
            self._note(f"slot {slot_id}: empty upstream slot (restarted?): the file of {owner!r} is kept")
            self._forget_emptied(keep=slot_id, infos=infos)
            return
        name = self.file_for(owner)
        try:
            self.llm.slot_save(slot_id, name)
            self._count("save", "ok")
            with self._lock:
                self._saves[owner] = self._saves.get(owner, 0) + 1
        except KVCacheError as exc:
            self._count("save", "failed")
            self._note(f"slot {slot_id}: save for {owner!r} failed: {exc}")
            return
        if self.store is not None:
            try:
                slot_files.record_saved(self.store, owner, name)
            except KVCacheError as exc:
                self._note(f"slot {slot_id}: could not record {name} for {owner!r}: {exc}")

    def _has_file(self, session_key: str, name: str) -> bool:
        """Whether the store records ``name`` as saved for the session (no store, or it
        cannot say: assume so, and let the upstream answer)."""
        if self.store is None:
            return True
        try:
            return name in slot_files.saved_for(self.store, session_key)
        except KVCacheError:
            return True

    def _restore(self, slot_id: int, session_key: str) -> int:
        """Restore the session's file into the slot (none recorded: no call); tokens restored."""
        name = self.file_for(session_key)
        if not self._has_file(session_key, name):
            self._count("restore", "no_file")
            return 0
        try:
            result = self.llm.slot_restore(slot_id, name)
        except KVCacheError:
            self._count("restore", "no_file")
            return 0
        self._count("restore", "ok")
        with self._lock:
            self._restores[session_key] = self._restores.get(session_key, 0) + 1
        return int(result.n_restored)
