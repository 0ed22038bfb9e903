"""``process`` on a conversation ``import`` stored: run the engine over it, store it once.

``import`` stores messages only (no cache entries, clears, snapshots, summaries, turn
log) and marks the session with the index of the first message the engine has not run
(``sessions_admin.ENGINE_FROM_KEY``; a session imported before the mark existed is
recognised by having messages and nothing the engine writes). When ``process`` is given
the conversation again, in a file holding at least every stored message, the replay
starts at the mark: its first turn's transaction deletes the stored messages from the
mark on (with their index rows and vectors) and every turn stores its messages as
``process`` always does. So each message is stored once, and the clears, snapshots,
summaries and retrievals are those of a fresh replay (no turn sees later messages). An
interrupted replay keeps the turns it finished; running it again completes it from the
file.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from kvcache_cli.store import sessions, sessions_admin

if TYPE_CHECKING:
    from kvcache_cli.services.core import Core
    from kvcache_cli.store import models as m


def rerun_from(core: Core, session_key: str, matched: int, length: int) -> int | None:
    """Where the engine must start on the stored messages of ``session_key``, or None.

    ``matched``: how many of the file's ``length`` messages are stored already.
    """
    session = sessions.find(core.store, session_key)
    if session is None or matched == 0:
        return None
    sid = session.get_id()
    mark = sessions_admin.engine_from(core.store, sid)
    if mark is None:
        if not sessions_admin.engine_never_ran(core.store, sid):
            return None
        mark = 0
    stored = sessions.stored_count(core.store, sid)
    if mark >= stored:
        return None
    if length < stored:
        core.notice(
            f"session {session_key}: messages {mark}..{stored - 1} were imported without the engine; "
            "process a file holding the whole conversation to run them"
        )
        return None
    return mark


def drop_unrun(core: Core, session: m.Session, index: int) -> None:
    """Delete the stored messages from ``index`` on, which the replay stores again, and the
    mark (inside the first replayed turn's transaction)."""
    users = sessions_admin.drop_messages_from(core.store, session.get_id(), index)
    session.turn_count = max(0, session.turn_count - users)  # import counted them as turns
    meta = json.loads(session.metadata or "{}")
    meta.pop(sessions_admin.ENGINE_FROM_KEY, None)
    session.metadata = json.dumps(meta, sort_keys=True)
    core.forget_replay_state()  # in-memory indexes of the session held the deleted rows
