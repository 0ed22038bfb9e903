"""``process`` on a conversation ``import`` stored: run the engine over the stored messages.

``import`` stores messages only (no cache entries, clears, snapshots, summaries, turn
log), counts their user messages as turns, and marks the session with the index of the
first message the engine has not run (``sessions_admin.ENGINE_FROM_KEY``). When
``process`` is given the conversation again, in a file holding at least every stored
message, the replay starts at the mark and runs each turn over messages that are
already stored: nothing is deleted or stored again (ids, index rows and vectors stay;
only the token counts are set to the run's). Each turn's transaction advances the mark
to the turn's end (and drops it after the last stored message), so an interrupted
replay leaves every message stored and the mark at a turn boundary, and running it
again continues from there.

A turn sees what it would have seen in a fresh replay: the messages through its
question (the summary, the in-memory tier-3 index and the semantic scores stop there;
see ``summaries``, ``retrieve``). The session's ``turn_count`` keeps counting the user
messages not run yet, as ``import`` did; while a turn runs it holds the turns the
engine ran (the turn log's last number), so the turn is numbered as in a fresh replay.

Sessions imported before the mark existed are marked on the first ``process`` when
nothing but such an import touched them (``sessions_admin.mark_if_imported_unmarked``);
a processed session whose cache ``maintain`` released is never taken for one.

Limit: when more than ``session_index.MAX_INDEXED_MESSAGES`` messages precede a turn's
question at the replay's first search, tier 3 ranks through the store's full-text index
as a fresh replay does, but that index's statistics also count the later imported
messages (the results still stop at the question), so rankings may differ slightly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvcache_cli.store import sessions, sessions_admin

if TYPE_CHECKING:
    from kvcache_cli.services.core import Core
    from kvcache_cli.store import models as m


def rerun_from(
    core: Core, session: m.Session | None, session_key: str, matched: int, length: int
) -> int | None:
    """Where the engine must start on the stored messages of ``session_key``, or None.

    ``session``: its stored row, read just before (None: not stored). ``matched``: how
    many of the file's ``length`` messages are stored already. Outside any transaction
    (a session imported before marks existed is marked in its own).
    """
    if session is None or matched == 0:
        return None
    sid = session.get_id()
    mark = sessions_admin.mark_in(_meta(session))
    if mark is None:
        if session.capacity_bytes or session.conversation_count or session.total_clears:
            return None  # the engine made it (the usual case: no transaction)
        if not core.store.transaction(lambda: sessions_admin.mark_if_imported_unmarked(core.store, sid)):
            return None
        mark = 0
    stored = sessions.stored_count(core.store, sid)
    if mark >= stored:
        return None
    if length < stored:
        core.notice(
            f"session {session_key}: messages {mark}..{stored - 1} were imported without the engine; "
            "process a file holding the whole conversation to run them "
            f"(kvcache export {session_key} | kvcache process -)"
        )
        return None
    return mark


@dataclass
class ImportedTurn:
    """A turn over messages ``import`` stored, inside its transaction (see the module doc)."""

    mark: int  # the first message the engine has not run
    stored: int  # messages stored when the turn began
    waiting_users: int = 0  # user messages stored and not run, counted in turn_count

    def kept(self, start: int, hi: int) -> int:
        """How many of the turn's messages ``start..hi-1`` are stored already."""
        return max(0, min(hi, self.stored) - start)


def open_turn(core: Core, session: m.Session, stored: int) -> ImportedTurn | None:
    """The imported state of a session at the start of a turn's transaction, or None.

    Sets ``session.turn_count`` to the turns the engine ran, for the turn's numbering.
    """
    mark = sessions_admin.mark_in(_meta(session))
    if mark is None or mark >= stored:
        return None
    ran = sessions_admin.engine_turns(core.store, session.get_id())
    turn = ImportedTurn(mark=mark, stored=stored, waiting_users=max(0, session.turn_count - ran))
    session.turn_count -= turn.waiting_users
    return turn


def close_turn(session: m.Session, turn: ImportedTurn, ran_users: int, hi: int) -> None:
    """End the turn: ``turn_count`` counts the user messages still waiting again and the mark
    moves to ``hi`` (gone once every stored message has run); in the turn's transaction.

    ``ran_users``: user messages of the turn that were waiting (stored by the import).
    """
    session.turn_count += max(0, turn.waiting_users - ran_users)
    meta = _meta(session)
    if hi >= turn.stored:
        meta.pop(sessions_admin.ENGINE_FROM_KEY, None)
    else:
        meta[sessions_admin.ENGINE_FROM_KEY] = hi
    session.metadata = json.dumps(meta, sort_keys=True)


def _meta(session: m.Session) -> dict[str, object]:
    try:
        meta = json.loads(session.metadata or "{}")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}
