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

With every match a candidate it ranks as the store's search does, where the two
tokenisers agree (``textsearch.tokenize`` follows FTS5's ``unicode61`` closely for Latin
text; other scripts may split or fold differently).

The index follows the store: a row count that no longer adds up (rows deleted or
written by another process out of order) reloads the session; callers drop indexes
whose transaction rolled back (:meth:`SessionIndexes.forget`). A session with more
than ``MAX_INDEXED_MESSAGES`` messages when first seen, or with a message longer than
``MAX_INDEXED_TEXT``, is not indexed: the replay then asks the store
(``manager.BIG_SESSION_SEARCH``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvcache_cli.errors import StoreError
from kvcache_cli.retrieval import documents, ranking
from kvcache_cli.retrieval import textsearch as ts
from kvcache_cli.store import sessions

if TYPE_CHECKING:
    from kvcache_cli.store.backend import Store

__all__ = ["SessionIndex", "SessionIndexes"]


class SessionIndex:
    """The messages of one session: candidate documents, postings and total length."""

    def __init__(self, session_id: int) -> None:
        self.session_id = session_id
        self.last_id = 0
        self.docs: dict[int, documents.Doc] = {}  # message_index -> document
        self.roles: dict[int, str] = {}
        self.postings: dict[str, list[int]] = {}  # stem -> message indexes holding it
        # stem -> indexes whose speaker's name has it but whose text does not
        self.speaker_only: dict[str, set[int]] = {}
        self.scoring: dict[str, list[int]] = {}  # the same, outside a speaker: prefix
        self.scoring_tf: dict[str, list[int]] = {}  # their counts there (same order)
        self.lengths: dict[int, int] = {}  # message_index -> token count
        self.total_len = 0

    def sync(self, store: Store, below: int | None = None) -> bool:
        """Add the rows stored since the last call (reload if the count disagrees).

        ``below``: only the messages with a lower index (a turn of an imported session
        sees the messages through its question, not the later ones ``import`` stored).
        False, and nothing added, when a new message is longer than ``MAX_INDEXED_TEXT``.
        """
        sid = self.session_id
        for _attempt in range(3):
            count = sessions.count_messages(store, sid, below)
            new = sessions.messages_after_id(store, sid, self.last_id, below)
            if len(self.docs) + len(new) == count:
                if any(len(row[4] or "") > MAX_INDEXED_TEXT for row in new):
                    return False
                for row in new:
                    self._add(*row)
                return True
            self.__init__(sid)  # type: ignore[misc]  # start over from the whole session
        raise StoreError(f"session {sid}: its messages kept changing while being read; try again")

    def _add(
        self, mid: int, index: int, role: str, name: str | None, content: str | None, stamp: Any
    ) -> None:
        text = content or ""
        documents.profile(text, remember=True)  # full stem counts, kept for every later turn
        doc = documents.make_doc(mid, self.session_id, index, name, text, stamp)
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
        for st in doc.speaker_stems:
            if st not in doc.stems:
                self.speaker_only.setdefault(st, set()).add(index)

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
        matches: set[int] = set()  # what the store's full-text query matches
        for s in stems:
            matches.update(self.postings.get(s, ()))
        if not matches:
            return []
        # document frequencies as session_idf counts them over those matches: a match
        # whose speaker's name holds the word counts for it too
        idf = {
            s: ts.bm25_idf(n, len(self.postings.get(s, ())) + len(self.speaker_only.get(s, set()) & matches))
            for s in stems
        }
        # a message holding a query word only in its speaker prefix scores nothing
        lists = {s: self.scoring.get(s, []) for s in stems}
        matches = set()
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


#: A session with more stored messages than this when a replay first searches it, or
#: holding a message longer than ``MAX_INDEXED_TEXT`` characters, is searched through the
#: store instead: building the index reads and tokenises the whole session (about 0.1 ms
#: and a few KB per ordinary message), which a short replay onto a big imported session
#: would not win back, and a huge message would be held whole in memory.
MAX_INDEXED_MESSAGES = 10_000
MAX_INDEXED_TEXT = documents.PROFILE_TEXT_MAX


class SessionIndexes:
    """The indexes of the sessions a replay is working on (the few most recent)."""

    def __init__(self, keep: int = 4, max_messages: int | None = None) -> None:
        self.keep = keep
        self.max_messages = MAX_INDEXED_MESSAGES if max_messages is None else max_messages
        self._by_session: dict[int, SessionIndex] = {}
        self._too_big: set[int] = set()

    def get(self, store: Store, session_id: int, below: int | None = None) -> SessionIndex | None:
        """The session's index, brought up to date with what the current transaction sees
        (with ``below``: its messages of a lower index, see ``SessionIndex.sync``).

        None for a session too big to index (more than ``max_messages`` when first seen).
        """
        sid = int(session_id)
        index = self._by_session.pop(sid, None)
        if index is None:
            if sid in self._too_big:
                return None
            count = sessions.count_messages(store, sid)
            count = count if below is None else min(count, below)
            if count > self.max_messages:
                self._too_big.add(sid)
                return None
            index = SessionIndex(sid)
        if not index.sync(store, below):
            self._too_big.add(sid)
            return None
        self._by_session[sid] = index  # most recent last
        while len(self._by_session) > self.keep:
            self._by_session.pop(next(iter(self._by_session)))
        return index

    def forget(self) -> None:
        """Drop every index (a transaction rolled back: what they read may be gone)."""
        self._by_session.clear()
        self._too_big.clear()
