"""The average FTS5 document length of a session, followed incrementally during a replay.

Reads FTS5's ``_docsize`` records (varint token counts, decoded by ``search_sqlite``)
of only the rows added since the last call, so a replay's per-turn tier-3 search of a
big session does not re-read the whole session's lengths every turn.
"""

from __future__ import annotations

from kvcache_cli.store.connection import Store
from kvcache_cli.store.search_sqlite import FTS_TABLE, _varints


class SessionLengths:
    """Per session: (last message id, messages seen, indexed rows, token total)."""

    def __init__(self) -> None:
        self._state: dict[int, tuple[int, int, int, int]] = {}

    def average(self, store: Store, session_id: int) -> float | None:
        """``search_sqlite._session_avg_len`` of a session (same value), read incrementally.

        A count mismatch (rows deleted by another writer) starts over from the whole
        session; None when the session cannot be followed (the search reads it itself).
        """
        state = self._state
        sid = int(session_id)
        for _attempt in range(2):
            (count,) = store.query("SELECT count(*) FROM messages WHERE session_id = ?", (sid,))[0]
            last_id, seen, rows, total = state.get(sid, (0, 0, 0, 0))
            new = store.query(
                f"SELECT m.id, d.sz FROM messages AS m LEFT JOIN {FTS_TABLE}_docsize AS d ON d.id = m.id "
                "WHERE m.session_id = ? AND m.id > ? ORDER BY m.id",
                (sid, last_id),
            )
            if seen + len(new) != count:
                state.pop(sid, None)
                continue
            for mid, blob in new:
                last_id = mid
                if blob is None:
                    continue
                rows += 1
                vals = _varints(bytes(blob), 2)
                if len(vals) == 2:
                    total += vals[1]
            state[sid] = (last_id, count, rows, total)
            return total / rows if rows and total > 0 else 1.0
        return None

    def forget(self) -> None:
        """Drop everything (a transaction rolled back: what was read may be gone)."""
        self._state.clear()
