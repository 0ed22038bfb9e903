"""In-memory keyword index of one session's history, for a replay's per-turn tier-3 lookup.

``kvcache process`` searches tier 3 on most question turns. Asking the store's
full-text index each time (and re-reading, re-tokenising the candidate rows) cost
most of a replay, so a replay keeps this index of the session's messages instead
and brings it up to date at each turn from the rows stored since (one small query,
inside the turn's transaction, so it sees exactly what the turn sees).

Ranking is :func:`ranking.rank_candidates` (the method of ``kvcache retrieve``), over
the session's ``candidates`` best messages by plain BM25 with the session's own
statistics: exact document frequencies and average length from this index. The
store's index is not read, so a replay's results depend neither on other sessions
nor on the backend. ``kvcache retrieve`` still ranks every match through the store.

The index follows the store: a row count that no longer adds up (rows deleted or
written by another process out of order) reloads the session; callers drop indexes
whose transaction rolled back (:meth:`SessionIndexes.forget`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import ranking
from . import textsearch as ts

if TYPE_CHECKING:
    from .store.backend import Store

__all__ = ["SessionIndex", "SessionIndexes"]


class SessionIndex:
    """The messages of one session: candidate documents, postings and total length."""

    def __init__(self, session_id: int) -> None:
        self.session_id = session_id
        self.last_id = 0
        self.docs: dict[int, ranking.Doc] = {}  # message_index -> document
        self.roles: dict[int, str] = {}
        self.postings: dict[str, list[int]] = {}  # stem -> message indexes holding it
        self.scoring: dict[str, list[int]] = {}  # the same, outside a speaker: prefix
        self.scoring_tf: dict[str, list[int]] = {}  # their counts there (same order)
        self.lengths: dict[int, int] = {}  # message_index -> token count
        self.total_len = 0

    def sync(self, store: Store) -> None:
        """Add the rows stored since the last call (reload if the count disagrees)."""
        sid = self.session_id
        (count,) = store.query("SELECT count(*) FROM messages WHERE session_id = ?", (sid,))[0]
        for _attempt in range(2):
            new = store.query(
                "SELECT id, message_index, role, name, content, timestamp FROM messages "
                "WHERE session_id = ? AND id > ? ORDER BY id",
                (sid, self.last_id),
            )
            if len(self.docs) + len(new) == count:
                for row in new:
                    self._add(*row)
                return
            self.__init__(sid)  # type: ignore[misc]  # start over from the whole session
        raise AssertionError(f"session {sid}: message count changed while reading")

    def _add(
        self, mid: int, index: int, role: str, name: str | None, content: str | None, stamp: Any
    ) -> None:
        text = content or ""
        ranking.profile(text, remember=True)  # full stem counts, kept for every later turn
        doc = ranking.make_doc(mid, self.session_id, index, name, text, stamp)
        index = int(index)
        self.last_id = max(self.last_id, int(mid))
        self.docs[index] = doc
        self.roles[index] = role
        self.total_len += doc.length
        self.lengths[index] = doc.length
        for st, tf in doc.stems.items():
            self.postings.setdefault(st, []).append(index)
            if tf > 0:
                self.scoring.setdefault(st, []).append(index)
                self.scoring_tf.setdefault(st, []).append(tf)

    def search(
        self,
        query: str,
        limit: int,
        candidates: int,
        params: ranking.RankParams = ranking.RankParams(),  # noqa: B008
        bridge_top: int | None = None,
        keep: Callable[[int], bool] | None = None,
    ) -> list[ranking.Hit]:
        """The session's best ``limit`` messages for ``query`` (see the module doc).

        ``bridge_top`` and ``keep`` (which message indexes may be results) are
        :func:`ranking.rank_candidates`' own.
        """
        terms = ts.query_terms(query)
        if limit <= 0 or not self.docs or ts.fts5_match(terms) is None:
            return []
        stems = list(dict.fromkeys(ts.stem(t) for t in terms))
        n = len(self.docs)
        idf = {s: ts.bm25_idf(n, len(self.postings.get(s, ()))) for s in stems}
        # a message holding a query word only in its speaker prefix scores nothing
        lists = {s: self.scoring.get(s, []) for s in stems}
        matches: set[int] = set()
        for found in lists.values():
            matches.update(found)
        if not matches:
            return []
        avg = self.total_len / n
        if len(matches) > candidates:
            chosen = self._best(lists, idf, avg, params.length_b, candidates)
        else:
            chosen = sorted(matches)
        docs = [self.docs[i] for i in chosen]

        def fetch(_sid: int, wanted: list[int]) -> list[tuple[int, int, str, str | None]]:
            return [
                (d.message_id, i, d.content, d.name) for i in wanted if (d := self.docs.get(i)) is not None
            ]

        return ranking.rank_candidates(
            docs, query, terms, idf, avg, limit, fetch, params, bridge_top=bridge_top, keep=keep
        )

    def _best(
        self, lists: dict[str, list[int]], idf: dict[str, float], avg: float, b: float, k: int
    ) -> list[int]:
        """The ``k`` messages with the highest plain BM25 (ties: lower message id)."""
        scores: dict[int, float] = {}
        get, lengths = scores.get, self.lengths
        k1 = ranking.BM25_K1
        base, per_token = k1 * (1.0 - b), k1 * b / avg  # BM25's k1 * (1 - b + b * dl / avgdl)
        for s, found in lists.items():
            w = idf[s] * (k1 + 1.0)
            for i, tf in zip(found, self.scoring_tf.get(s, ()), strict=True):
                scores[i] = get(i, 0.0) + w * tf / (tf + base + per_token * lengths[i])
        docs = self.docs
        best = heapq.nsmallest(k, scores, key=lambda i: (-scores[i], docs[i].message_id))
        return sorted(best)


class SessionIndexes:
    """The indexes of the sessions a replay is working on (the few most recent)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._by_session: dict[int, SessionIndex] = {}

    def get(self, store: Store, session_id: int) -> SessionIndex:
        """The session's index, brought up to date with what the current transaction sees."""
        sid = int(session_id)
        index = self._by_session.pop(sid, None) or SessionIndex(sid)
        self._by_session[sid] = index  # most recent last
        while len(self._by_session) > self.keep:
            self._by_session.pop(next(iter(self._by_session)))
        index.sync(store)
        return index

    def forget(self) -> None:
        """Drop every index (a transaction rolled back: what they read may be gone)."""
        self._by_session.clear()
