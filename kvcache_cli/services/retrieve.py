"""Retrieval over a session's three tiers (active cache, recent snapshots, full history),
or over every session's history: for the ``retrieve`` command and each replayed turn.

Tier 1 and 2 rank in-memory entries (``retrieval.fusion``); tier 3 asks the store's
full-text index (or, during a replay, the session's in-memory index); a semantic
strategy adds cosine scores of stored embeddings (``retrieval.strategies``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kvcache_cli.engine import bridge
from kvcache_cli.engine.entries import KVEntry, key_hash_for
from kvcache_cli.engine.scoring import next_engagement
from kvcache_cli.errors import BadInputError, ConfigError, ServerError
from kvcache_cli.retrieval import strategies as st
from kvcache_cli.retrieval.fusion import (
    TIER_THRESHOLDS,
    RetrievalResult,
    RetrievedEntry,
    merge_results,
    rank_entries,
)
from kvcache_cli.retrieval.textsearch import matched_keywords, query_terms
from kvcache_cli.services.cache_ops import cached_snapshot_entries
from kvcache_cli.services.core import Core
from kvcache_cli.store import cache, counters, search, sessions, snapshots, vectors
from kvcache_cli.store import models as m
from kvcache_cli.store.migrations import utcnow

if TYPE_CHECKING:
    from kvcache_cli.retrieval.session_index import SessionIndex

# The replay's per-turn tier-3 lookup ranks the session's best plain-BM25 matches from
# its in-memory index (session_index), not every match: `kvcache retrieve` is unchanged.
# Measured on LoCoMo (bench/README.md): 50 candidates and bridges around the best 10 keep
# R@10 within 0.004 of ranking every match, at a quarter of the cost.
REPLAY_CANDIDATES = 50
REPLAY_BRIDGE_TOP = 10
# A session too big for the in-memory index (session_index.MAX_INDEXED_MESSAGES) ranks
# the store's own 50 best matches of the session instead.
BIG_SESSION_SEARCH: dict[str, Any] = {"max_session_matches": 50, "candidates": 50}


def in_session(
    core: Core,
    session: m.Session,
    query: str,
    tiers: tuple[int, ...],
    limit: int,
    cascade: bool,
    exclude_from: int | None,
    active: list[KVEntry] | None,
    now: datetime,
    min_score: float = 0.0,
    semantic: tuple[list[float], str] | None = None,
    notice: str | None = None,
) -> RetrievalResult:
    """Search the tiers of one session and record the retrieval (inside a transaction).

    ``cascade`` (a replayed turn): each tier only when the ones before found too little,
    with the tiers' own thresholds. ``semantic`` is the query's embedding and model name
    (computed before the transaction); without it a semantic strategy runs as
    keyword_only (``notice``).
    """
    store = core.store
    started = time.perf_counter()
    result = new_result(core, query, semantic, notice)
    strategy = result.strategy
    sims = semantic_scores(core, session.get_id(), semantic) if semantic is not None else None
    # a replayed turn sees the messages through its question, not later ones an import stored
    seen_below = exclude_from + 1 if cascade and exclude_from is not None else None
    if sims is not None and seen_below is not None:
        sims = {idx: v for idx, v in sims.items() if idx < seen_below}
    hy = core.config.cache.hybrid
    lookup: dict[tuple[str, Any], float] | None = None
    ctx: dict[int, float] = {}
    if sims and strategy == "hybrid":  # the semantic side with neighbour context
        cosines = {idx: cos for idx, (_, cos) in sims.items()}
        ctx = st.semantic_context(cosines, weight=st.parse_fusion(core.fusion).context)
        lookup = {(session.key, idx): v for idx, v in ctx.items()}

    def combine(
        kw: list[RetrievedEntry], sem: list[RetrievedEntry] | None, need: int
    ) -> list[RetrievedEntry]:
        return st.combine(
            strategy, kw, sem, need, keep, hy.keyword_weight, hy.semantic_weight, core.fusion, lookup
        )

    found: list[RetrievedEntry] = []
    thresholds = TIER_THRESHOLDS if cascade else {1: min_score, 2: min_score, 3: min_score}
    # a replay's turn reads the session from its in-memory index (session_index)
    index = core.replay_indexes.get(store, session.get_id(), seen_below) if cascade else None
    if active is None:
        active = cache.active_entries(store, session.get_id())
    in_cache = {e.message_index for e in active if e.message_index is not None}

    def keep(item: RetrievedEntry) -> bool:
        if exclude_from is not None and item.message_index is not None and item.message_index >= exclude_from:
            return False
        return item.score > thresholds[item.tier] or (not cascade and item.score >= min_score)

    # a keyword list longer than a tier takes changes nothing unless fusion or a
    # semantic-first fill reads its tail: then rank only the best ``need``
    def kw_cap(need: int) -> int | None:
        exact = sims is None or strategy in ("keyword_only", "keyword_then_semantic")
        return need if exact else None

    if 1 in tiers and active:
        result.tiers_searched.append(1)
        # the question itself (and anything after it) is no candidate, nor anyone's context
        past = [
            e
            for e in active
            if exclude_from is None or e.message_index is None or e.message_index < exclude_from
        ]
        hits = rank_entries(
            query, past, 1, session.key, names=entry_names(core, session, past, index), limit=kw_cap(10)
        )
        sem1 = st.semantic_entries(active, sims, 1, session.key, result.keywords_used)
        found += combine(hits, sem1, 10)[:10]
    if 2 in tiers and (not cascade or len(found) < 5):
        result.tiers_searched.append(2)
        entries: list[KVEntry] = []
        owners: list[int | None] = []
        seen_keys: set[str] = set()
        for sid, state_hash in snapshots.recent(store, session.get_id(), 3):
            for entry in cached_snapshot_entries(core, sid, state_hash):
                if entry.key_hash in seen_keys:
                    continue
                if cascade and entry.message_index in in_cache:
                    continue
                if exclude_from is not None and (entry.message_index or 0) >= exclude_from:
                    continue
                seen_keys.add(entry.key_hash)
                entries.append(entry)
                owners.append(sid)
        hits = rank_entries(
            query, entries, 2, session.key, owners, entry_names(core, session, entries, index), kw_cap(15)
        )
        sem2 = st.semantic_entries(entries, sims, 2, session.key, result.keywords_used, owners)
        found += combine(hits, sem2, 15)[:15]
    if 3 in tiers and (not cascade or len(found) < 3):
        result.tiers_searched.append(3)
        skip = in_cache if cascade else set()
        cap = 10 if cascade else limit * 2
        if cascade:  # a replay's turn: results filtered inside the ranking

            def wanted(idx: int) -> bool:
                return idx not in skip and (exclude_from is None or idx < exclude_from)

            if index is not None:  # the session's in-memory index
                kw3 = replay_history(query, session, index, kw_cap(cap) or limit * 2 + 10, wanted)
            else:  # a session too big to index: the store's best matches
                options = big_session_search(core, session)
                hits = search_history(core, query, session, limit * 2 + 10, **options)
                kw3 = [h for h in hits if h.message_index is not None and wanted(h.message_index)]
        else:
            kw3 = search_history(core, query, session, limit * 2 + 10)
        sem3 = None
        if sims is not None:
            best = sorted(
                ((ctx.get(idx, cos), cos, mid) for idx, (mid, cos) in sims.items() if idx not in skip),
                key=lambda x: (-x[0], x[2]),
            )[: limit * 2 + 10]
            sem3 = history_entries(
                core, [(mid, st.semantic_score(cos), None) for _, cos, mid in best], session, query
            )
        found += combine(kw3, sem3, cap)[:cap]
    merged = merge_results(found, limit)
    fill_roles(core, session, merged, index)
    finish_result(result, merged, started)
    after_retrieval(core, session, result, now)
    return result


def new_result(
    core: Core, query: str, semantic: tuple[list[float], str] | None, notice: str | None
) -> RetrievalResult:
    """An empty result for ``query`` with the strategy that will run (keyword_only for a
    semantic strategy without the query's embedding), the notice and the keywords."""
    result = RetrievalResult(query=query, strategy=core.config.cache.retrieval_strategy)
    if notice:
        result.notices.append(notice)
    result.strategy = st.resolve(result.strategy, semantic is not None)
    result.keywords_used = query_terms(query)
    return result


def finish_result(result: RetrievalResult, entries: list[RetrievedEntry], started: float) -> None:
    """Set the entries, the retrieval bridge text (when any) and the duration."""
    result.entries = entries
    if entries:
        result.bridge_message = bridge.retrieval_bridge(
            len(entries), result.primary_tier, result.keywords_used, result.average_similarity
        )
    result.search_duration_ms = (time.perf_counter() - started) * 1000.0


def fill_roles(
    core: Core, session: m.Session, entries: list[RetrievedEntry], index: SessionIndex | None = None
) -> None:
    """Give tier 1-2 results their message's stored role (cache entries keep none), so
    every row names its message as stored: content, index and role. An entry whose text
    is not its message's (a conversation file's own ``kv_entries``) keeps role None."""
    idxs = sorted({e.message_index for e in entries if e.role is None and e.message_index is not None})
    if not idxs:
        return
    stored: dict[int, tuple[str, str]]
    if index is not None:  # a replay's turn: the synced index has every stored message
        stored = {i: (index.roles[i], index.docs[i].content) for i in idxs if i in index.docs}
    else:
        stored = sessions.roles_and_contents(core.store, session.get_id(), idxs)
    for entry in entries:
        if entry.role is None and entry.message_index in stored:
            role, content = stored[entry.message_index]
            if entry.text == content:
                entry.role = role


def entry_names(
    core: Core, session: m.Session, entries: list[KVEntry], index: SessionIndex | None = None
) -> dict[int, str]:
    """Speaker names of the messages behind cache/snapshot entries (tier 1-2 speaker boost)."""
    idxs = sorted({e.message_index for e in entries if e.message_index is not None})
    if index is not None:  # a replay's turn: the synced index has every stored message
        out: dict[int, str] = {}
        for idx in idxs:
            doc = index.docs.get(idx)
            if doc is not None and doc.name:
                out[idx] = doc.name
        return out
    return sessions.speaker_names(core.store, session.get_id(), idxs)


def replay_history(
    query: str, session: m.Session, index: SessionIndex, limit: int, wanted: Callable[[int], bool]
) -> list[RetrievedEntry]:
    """Tier 3 of a replay's turn: the session's in-memory index (``session_index``).

    ``wanted(message_index)``: which messages may be results (not in the cache, not
    the question or later).
    """
    out = []
    hits = index.search(query, limit, REPLAY_CANDIDATES, bridge_top=REPLAY_BRIDGE_TOP, keep=wanted)
    for hit in hits:
        doc = index.docs[hit.message_index]
        out.append(
            RetrievedEntry(
                tier=3,
                score=hit.score,
                matched_keywords=list(hit.matched_keywords),
                text=doc.content,
                session_id=session.key,
                message_index=hit.message_index,
                key_hash=key_hash_for(session.key, hit.message_index, doc.content),
                role=index.roles[hit.message_index],
            )
        )
    return out


def big_session_search(core: Core, session: m.Session) -> dict[str, Any]:
    """Tier-3 options of a replay's turn on a session too big for ``session_index``.

    The store ranks only its own best ``BIG_SESSION_SEARCH`` matches (FTS5 bm25 or
    ts_rank_cd order); on SQLite the session's average length is followed
    incrementally (``store.fts_lengths``) instead of read whole at every turn.
    """
    core.require_history_index()
    options: dict[str, Any] = dict(BIG_SESSION_SEARCH)
    if core.store.is_sqlite:
        avg = core.fts_lengths.average(core.store, session.get_id())
        if avg is not None:
            options["session_avg_len"] = avg
    return options


def search_history(
    core: Core, query: str, session: m.Session | None, limit: int, **options: Any
) -> list[RetrievedEntry]:
    """Tier 3 from the store's full-text index (one session, or all)."""
    core.require_history_index()
    hits = search.search_messages(core.store, query, session.id if session else None, limit, **options)
    return history_entries(
        core, [(int(h.message_id), h.score, list(h.matched_keywords)) for h in hits], session
    )


def semantic_scores(
    core: Core, session_id: int, semantic: tuple[list[float], str]
) -> dict[int, tuple[int, float]]:
    """Cosine of the query with every stored vector of the session: index -> (message id, cos)."""
    from kvcache_cli.retrieval.embeddings import semantic_search

    vector, model = semantic
    pairs = semantic_search(core.store, session_id, vector, model, 1 << 30)
    cos_of = dict(pairs)
    return {idx: (mid, cos_of[mid]) for mid, idx in sessions.indexes_of(core.store, list(cos_of))}


def history_entries(
    core: Core, hits: list[tuple[int, float, list[str] | None]], session: m.Session | None, query: str = ""
) -> list[RetrievedEntry]:
    """Tier-3 results for ``(message id, score, matched keywords or None)``, in that order."""
    if not hits:
        return []
    terms = query_terms(query) if query else []
    rows = sessions.by_ids(core.store, [mid for mid, _, _ in hits])
    keys: dict[int, str] = {}
    if session is None:
        keys = sessions.keys_of(core.store, sorted({r[4] for r in rows.values()}))
    out = []
    for mid, score, matched in hits:
        row = rows.get(mid)
        if row is None:
            continue
        _, index, role, content, sid = row
        key = session.key if session else keys.get(sid, "?")
        out.append(
            RetrievedEntry(
                tier=3,
                score=score,
                matched_keywords=matched if matched is not None else matched_keywords(terms, content),
                text=content,
                session_id=key,
                message_index=index,
                key_hash=key_hash_for(key, index, content),
                role=role,
            )
        )
    return out


def after_retrieval(core: Core, session: m.Session, result: RetrievalResult, now: datetime) -> None:
    """Statistics, operation record and engagement (retrieved +0.15, the others x0.95)."""
    counters.bump(core.store, now, total_retrievals=1, entries_retrieved=len(result.entries))
    counters.record(
        core.store,
        session.key,
        "retrieve",
        len(result.entries),
        f"Tiers: {result.tiers_searched}, Keywords: {len(result.keywords_used)}",
        now,
    )
    touched = [e.key_hash for e in result.entries if e.session_id == session.key]
    if touched:
        cache.engage(
            core.store, session.get_id(), touched, lambda score: next_engagement(score, retrieved=True)
        )


def retrieve(
    core: Core,
    session_key: str | None,
    query: str,
    tiers: tuple[int, ...] = (1, 2, 3),
    limit: int = 10,
    min_score: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> RetrievalResult:
    """Ranked context for ``query`` from one session's tiers, or every session's history.

    ``progress`` is told, before a long wait, what is being done (embedding the
    session's messages that have no vector yet, before its first semantic search)."""
    if limit < 1:
        raise BadInputError("--limit must be at least 1")
    if not tiers or any(t not in (1, 2, 3) for t in tiers):
        raise BadInputError("tiers must be among 1, 2, 3")
    semantic, notice = query_embedding(core, session_key, query, progress)

    def work() -> RetrievalResult:
        now = utcnow()
        if session_key is None:
            return _in_all_sessions(core, query, limit, min_score, semantic, notice, now)
        session = core.session_for_update(session_key, create=False, now=now)
        return in_session(
            core,
            session,
            query,
            tiers,
            limit,
            cascade=False,
            exclude_from=None,
            active=None,
            now=now,
            min_score=min_score,
            semantic=semantic,
            notice=notice,
        )

    return core.store.transaction(work)


def _in_all_sessions(
    core: Core,
    query: str,
    limit: int,
    min_score: float,
    semantic: tuple[list[float], str] | None,
    notice: str | None,
    now: datetime,
) -> RetrievalResult:
    """Tier 3 of every session (``retrieve --all-sessions``), inside the transaction."""
    from kvcache_cli.retrieval.embeddings import semantic_search

    started = time.perf_counter()
    result = new_result(core, query, semantic, notice)
    result.tiers_searched = [3]
    kw = search_history(core, query, None, limit * 2 + 10)
    sem = None
    if semantic is not None:
        pairs = semantic_search(core.store, None, semantic[0], semantic[1], limit * 2 + 10)
        sem = history_entries(core, [(mid, st.semantic_score(c), None) for mid, c in pairs], None, query)
    hy = core.config.cache.hybrid
    hits = st.combine(
        result.strategy,
        kw,
        sem,
        limit,
        lambda e: e.score >= min_score,
        hy.keyword_weight,
        hy.semantic_weight,
        core.fusion,
    )
    finish_result(result, merge_results(hits, limit), started)
    counters.bump(core.store, now, total_retrievals=1, entries_retrieved=len(result.entries))
    counters.record(core.store, "*", "retrieve", len(result.entries), "Tiers: [3], all sessions", now)
    return result


def query_embedding(
    core: Core, session_key: str | None, query: str, progress: Callable[[str], None] | None = None
) -> tuple[tuple[list[float], str] | None, str | None]:
    """The query's vector and model for a semantic strategy, or None and a one-line notice.

    HTTP, so call it outside any transaction. For a one-session query, the session's
    stored messages that lack a vector are embedded first (in batches).
    """
    strategy = core.config.cache.retrieval_strategy
    if not st.needs_semantic(strategy):
        return None, None
    fallback = f"{strategy}: keyword_only used instead"
    if core.llm is None or getattr(core.llm, "_emb_base", True) is None:
        if strategy in st.QUIET_FALLBACK:  # the default: no server is no news
            return None, None
        return None, f"retrieval: no embeddings server configured; {fallback}"
    from kvcache_cli.retrieval.embeddings import TurnEmbedder, backfill_session, embed_query

    if not query.strip() or (not query_terms(query) and not any(ch.isalnum() for ch in query)):
        return None, None  # nothing to search for: empty result, no server call
    try:
        vector, model = embed_query(core.llm, query)
    except (ServerError, ConfigError) as exc:
        return None, f"retrieval: embeddings server failed ({exc}); {fallback}"
    if session_key is not None:
        session = sessions.find(core.store, session_key)
        if session is not None:
            notices: list[str] = []
            embedder = TurnEmbedder(core.llm, core.store, notices)
            if progress is not None and (
                todo := vectors.count_missing(core.store, session.get_id(), embedder.model)
            ):
                progress(
                    f"retrieval: embedding {todo} stored message(s) of {session_key} that have no "
                    "vector yet (once: later queries reuse them)"
                )
            backfill_session(embedder, session.get_id(), utcnow())
            if embedder.failed:
                return None, f"retrieval: embeddings server failed ({embedder.failure}); {fallback}"
    return (vector, model), None
