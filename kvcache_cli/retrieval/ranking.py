"""Backend-neutral keyword ranking: one implementation for SQLite, PostgreSQL and tiers 1-2.

The index backends (``search_sqlite``, ``store/search_postgres``) only find candidate
messages and term statistics; :func:`rank_candidates` scores them (docs/retrieval.md):

1. own score: BM25 (k1 = 1.2, ``b = length_b``) of the candidate's stems, the
   ``speaker:`` prefix counted in the length but not as a mention of the name,
   times ``(held / best held) ** coverage``, where ``held`` is the IDF sum of the
   query stems the turn holds and ``best held`` the largest over the candidates
   (coordination: a turn that covers more of the question beats one that repeats
   one of its words; the best-covering turns keep their score);
2. answer type: for a "when" question a turn holding a time expression gets
   ``* (1 + temporal_boost)``; word pairs adjacent in the query and within
   ``proximity_window`` tokens in the turn add a pseudo-term (:func:`_proximity`); a
   turn whose date fits a date named in the question gets ``* (1 + date_boost)``;
3. context: ``combined = own + context_weight * sum(decay**(d-1) * own(i +- d))`` over
   neighbours ``d = 1..context_window`` (by ``message_index``, same session); neighbours
   of the best turns that match nothing themselves enter on context alone ("bridges",
   fetched through the caller's ``fetch``);
4. answers, not echoes: a top turn that asks the query's words (in a sentence ending
   in ``?``) passes ``answer_weight`` times its own score to its answer, the next turn
   (or the one after, when the next answers nothing: "I don't know", a counter-question);
5. speaker: a turn whose speaker is named in the query gets ``* (1 + speaker_boost)``;
   then an answer ranks at least as high as its question (``answer_floor``);
6. ``Hit.score = 1 - exp(-combined / ideal)`` (:func:`ideal_score`).

:func:`rank_texts` runs the same method over an in-memory list (cache or snapshot
entries), with the list itself as the collection.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from kvcache_cli.retrieval import textsearch as ts
from kvcache_cli.retrieval.documents import (  # noqa: F401  (BM25_B, Doc, make_doc re-exported)
    BM25_B,
    BM25_K1,
    Doc,
    _base,
    _doc_matched,
    _has_temporal,
    _positions,
    _proximity,
    _tokens,
    is_profiled,
    make_doc,
    matched,
    name_profile,
    session_idf,
)

__all__ = [
    "BM25_K1",
    "Doc",
    "Hit",
    "RankParams",
    "bm25_terms",
    "ideal_score",
    "make_doc",
    "rank_candidates",
    "rank_params",
    "rank_texts",
    "similarity",
]


@dataclass(frozen=True)
class Hit:
    """One ranked message."""

    message_id: int
    session_id: int
    message_index: int
    score: float  # in [0, 1], monotone in raw_score for one query
    raw_score: float  # combined BM25 (own + context), larger is better
    matched_keywords: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RankParams:
    """Tuning of :func:`rank_candidates` (values measured in docs/retrieval.md)."""

    context_window: int = 3
    context_weight: float = 0.5
    context_decay: float = 0.8
    speaker_boost: float = 1.0
    temporal_boost: float = 0.3
    number_boost: float = 0.0
    date_boost: float = 3.0
    proximity_weight: float = 1.0
    proximity_window: int = 3
    length_b: float = 0.5
    bridges: bool = True
    # answers, not echoes: a matching question passes ``answer_weight`` times its own
    # score to the turn answering it, which then ranks at least as high (``answer_floor``)
    answer_weight: float = 1.0
    answer_floor: bool = True
    # coordination: own score times (IDF of the query stems held / the best candidate's) ** coverage
    coverage: float = 0.5


def rank_params(options: dict[str, Any]) -> RankParams:
    """:class:`RankParams` from keyword options (unknown names refused), typed like the defaults."""
    fields = {f.name: f.default for f in dataclasses.fields(RankParams)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(f"unknown ranking option {unknown[0]!r}")
    kwargs: dict[str, Any] = {}
    for name, value in options.items():
        default = fields[name]
        kwargs[name] = type(default)(value) if isinstance(default, bool | int | float) else value
    return RankParams(**kwargs)


#: ``(session_id, message indexes) -> rows (message_id, message_index, content, name)``
NeighbourFetcher = Callable[[int, list[int]], Iterable[tuple[Any, Any, Any, Any]]]


# ------------------------------------------------------------------------ scores
def _bm25_norm(doc_len: float, avg_len: float, b: float = BM25_B) -> float:
    """BM25 tf factor for tf = 1: ``(k1 + 1) / (1 + k1 * (1 - b + b * dl / avgdl))``."""
    avg = avg_len if avg_len > 0 else 1.0
    return (BM25_K1 + 1.0) / (1.0 + BM25_K1 * (1.0 - b + b * doc_len / avg))


def ideal_score(idfs: Sequence[float]) -> float:
    """BM25 of an ideal turn: every query word once, in a turn of average length.

    ``Hit.score = 1 - exp(-raw / ideal)``: 0.63 for a turn as good as the ideal,
    0.86 for twice as good; a turn matching keywords worth half the query's IDF
    mass scores about 0.4. Monotone in ``raw`` and comparable across queries.
    """
    return sum(idfs) * _bm25_norm(1.0, 1.0)


def similarity(raw: float, ideal: float) -> float:
    """Map a raw combined BM25 score into ``[0, 1]`` (see :func:`ideal_score`)."""
    if raw <= 0.0 or ideal <= 0.0:
        return 0.0
    return max(0.0, min(1.0, 1.0 - math.exp(-raw / ideal)))


def held_stems(
    doc_stems: Counter[str], idf: dict[str, float], order: dict[str, int] | None = None
) -> list[str]:
    """The stems of ``idf`` the document holds (count > 0), in ``idf``'s order.

    Found by a set intersection: a document costs its matches, not the query's length.
    ``order`` (stem -> position in ``idf``) saves rebuilding it per document.
    """
    present = [s for s in doc_stems.keys() & idf.keys() if doc_stems[s] > 0]
    if len(present) > 1:
        rank = order if order is not None else {s: i for i, s in enumerate(idf)}
        present.sort(key=rank.__getitem__)
    return present


def bm25_terms(
    doc_stems: Counter[str],
    doc_len: int,
    idf: dict[str, float],
    avg_len: float,
    b: float,
    present: list[str] | None = None,
) -> float:
    """FTS5's BM25 of one document for the stems in ``idf`` (k1 = 1.2).

    ``present``: :func:`held_stems` of the document, when the caller has it. The terms
    are summed in ``idf``'s order.
    """
    score = 0.0
    norm = BM25_K1 * (1.0 - b + b * doc_len / (avg_len if avg_len > 0 else 1.0))
    for s in held_stems(doc_stems, idf) if present is None else present:
        tf = doc_stems[s]
        score += idf[s] * tf * (BM25_K1 + 1.0) / (tf + norm)
    return score


# ------------------------------------------------------------------------ queries
# A replay ranks each question up to three times (tiers 1-3), and ``serve`` one request
# at a time: what a query asks is worked out once. Pure functions of the query, so a
# small LRU suffices (256: far more than the queries in flight at once; an entry is a
# few hundred bytes).
@lru_cache(maxsize=256)
def _query_kind(query: str) -> tuple[bool, bool, tuple[tuple[int | None, int | None, int | None], ...]]:
    """(asks when, asks how many, dates named) of ``query``."""
    return ts.is_temporal_question(query), ts.is_count_question(query), tuple(ts.query_dates(query))


@lru_cache(maxsize=256)
def _stem_filter(stems: tuple[str, ...]) -> ts.StemFilter:
    """The (immutable) :class:`ts.StemFilter` of a query's stems."""
    return ts.StemFilter(stems)


# ------------------------------------------------------------------------ ranking
def rank_candidates(
    docs: Sequence[Doc],
    query: str,
    terms: Sequence[str],
    idf: dict[str, float],
    avg_len: float,
    limit: int,
    fetch: NeighbourFetcher | None,
    params: RankParams = RankParams(),  # noqa: B008 (frozen)
    bridge_top: int | None = None,
    keep: Callable[[int], bool] | None = None,
) -> list[Hit]:
    """Score candidate messages for ``query`` (see the module doc); best ``limit`` hits.

    ``idf`` maps every query stem to its weight; ``avg_len`` is the collection's
    average message length (one session's for a per-session query). ``fetch`` reads
    bridge neighbours (None: no bridges) around the best ``bridge_top`` candidates
    (default ``max(limit, 10)``). ``keep(message_index)`` false: not a result (still
    context for its neighbours). Ties: message id ascending.
    """
    if limit <= 0 or not docs:
        return []
    p = params
    stems = list(idf)
    stem_set_q = frozenset(stems)
    is_temporal, is_count, query_dates = _query_kind(query)
    temporal_q = p.temporal_boost > 0 and is_temporal
    count_q = p.number_boost > 0 and is_count
    dates = query_dates if p.date_boost > 0 else ()
    date_stems = {st for st in (ts.stem(t) for t in ts.date_words(query)) if st in idf} if dates else set()
    # query-adjacent word pairs (sequential dependence): (stem a, stem b, pair weight)
    pairs: list[tuple[str, str, float]] = []
    if p.proximity_weight > 0:
        qstems = [s for s in dict.fromkeys(ts.stem(t) for t in terms) if s in idf]
        pairs = [
            (a, b, p.proximity_weight * min(idf[a], idf[b])) for a, b in zip(qstems, qstems[1:], strict=False)
        ]
        pfilter = _stem_filter(tuple(qstems))

    own: dict[tuple[int, int], float] = {}
    info: dict[tuple[int, int], tuple[int, str]] = {}
    doc_of: dict[tuple[int, int], Doc] = {}
    named: set[tuple[int, int]] = set()
    order = {s: i for i, s in enumerate(idf)}
    held: dict[tuple[int, int], float] = {}  # IDF sum of the query stems a candidate holds
    for d in docs:
        present = held_stems(d.stems, idf, order)
        if not present:
            continue  # matched only through the speaker prefix
        sc = bm25_terms(d.stems, d.length, idf, avg_len, p.length_b, present)
        key = (d.session_id, d.index)
        if p.coverage > 0:
            held[key] = sum(idf[s] for s in present)
        if p.speaker_boost > 0 and not d.speaker_stems.isdisjoint(stem_set_q):
            named.add(key)
        if temporal_q and _has_temporal(d.content):
            sc *= 1.0 + p.temporal_boost
        if count_q and ts.has_number(_tokens(d.content)):
            sc *= 1.0 + p.number_boost
        if pairs and len(present) >= 2:
            found = _positions(pfilter, d.content, d.prefix_len, present)
            sc += _proximity(found, pairs, p.proximity_window, d.length, avg_len, p.length_b)
        if dates and ts.date_matches(d.day, dates):
            sc *= 1.0 + p.date_boost
            if key in held:  # the turn's date holds the query's date words
                held[key] += sum(idf[s] for s in date_stems.difference(present))
        own[key] = sc
        info[key] = (d.message_id, d.content)
        doc_of[key] = d
    best_held = max(held.values(), default=0.0)
    if best_held > 0:  # relative to the best-covering candidate: that one keeps its score
        for key, mass in held.items():
            own[key] *= (mass / best_held) ** p.coverage

    window, weight, decay = p.context_window, p.context_weight, p.context_decay
    dist_weights = [(dist, decay ** (dist - 1)) for dist in range(1, window + 1)]
    own_rows: dict[int, dict[int, float]] = {}  # session -> index -> own score
    for (sid, idx), sc in own.items():
        own_rows.setdefault(sid, {})[idx] = sc

    def context(key: tuple[int, int]) -> float:
        sid, idx = key
        row = own_rows.get(sid)
        if row is None:
            return 0.0
        get = row.get
        total = 0.0
        for dist, w in dist_weights:
            total += w * (get(idx - dist, 0.0) + get(idx + dist, 0.0))
        return total

    use_ctx = window > 0 and weight > 0
    combined = {k: v + (weight * context(k) if use_ctx else 0.0) for k, v in own.items()}

    if p.bridges and use_ctx and combined and fetch is not None:
        # neighbours with no keyword of their own, around the best candidates
        pool = bridge_top if bridge_top is not None else max(limit, 10)
        top = heapq.nsmallest(pool, combined, key=lambda k: (-combined[k], info[k][0]))
        wanted: dict[int, set[int]] = {}
        named_in_query: dict[str, bool] = {}  # speaker name -> named in the query
        for sid, idx in top:
            for dist in range(-window, window + 1):
                if dist and (sid, idx + dist) not in own and idx + dist >= 0:
                    wanted.setdefault(sid, set()).add(idx + dist)
        for sid, idx_set in sorted(wanted.items()):
            for mid, idx, content, name in fetch(sid, sorted(idx_set)):
                key = (sid, int(idx))
                if key in own:
                    continue
                info[key] = (int(mid), content or "")
                combined[key] = weight * context(key)
                if name and p.speaker_boost > 0:
                    hit = named_in_query.get(name)
                    if hit is None:
                        hit = named_in_query[name] = not stem_set_q.isdisjoint(name_profile(name)[1])
                    if hit:
                        named.add(key)

    answers: list[tuple[tuple[int, int], tuple[int, int]]] = []
    if p.answer_weight > 0 or p.answer_floor:
        pool = bridge_top if bridge_top is not None else max(limit, 10)
        top = heapq.nsmallest(pool, own, key=lambda k: (-combined[k], info[k][0]))
        answers = _answers(top, own, info, stems)
        for question, answer in answers:
            if answer not in combined:
                combined[answer] = weight * context(answer) if use_ctx else 0.0
            combined[answer] += p.answer_weight * own[question]

    if p.speaker_boost > 0:
        for key in named:
            combined[key] *= 1.0 + p.speaker_boost
    if p.answer_floor:
        for question, answer in answers:
            if combined[answer] <= combined[question]:  # just above: ranks first, same score
                combined[answer] = math.nextafter(combined[question], math.inf)

    ranked = heapq.nsmallest(  # = sorted(...)[:limit]
        limit,
        (k for k in combined if combined[k] > 0 and (keep is None or keep(k[1]))),
        key=lambda k: (-combined[k], info[k][0]),
    )
    ideal = ideal_score(list(idf.values()))
    term_stems = [(t, ts.stem(t)) for t in terms]
    stem_set = frozenset(st for _, st in term_stems)
    return [
        Hit(
            message_id=info[key][0],
            session_id=key[0],
            message_index=key[1],
            score=similarity(combined[key], ideal),
            raw_score=combined[key],
            matched_keywords=(
                _doc_matched(terms, doc_of[key], term_stems, stem_set)
                if key in doc_of
                else matched(terms, info[key][1])
            ),
        )
        for key in ranked
    ]


def _answers(
    top: Sequence[tuple[int, int]],
    own: dict[tuple[int, int], float],
    info: dict[tuple[int, int], tuple[int, str]],
    stems: Sequence[str],
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``(question, answer)`` pairs: a top turn that asks the query's words, and its answer.

    A turn asks when the query stems it holds weigh at least as much in its questions
    (sentences ending in ``?``) as elsewhere. Its answer is the next turn, or the one
    after when the next answers nothing (a counter-question, "I don't know": the asker
    then often answers it). Only turns whose text is known (``info``) are looked at.
    """
    out = []
    for key in top:
        sid, idx = key
        if own.get(key, 0.0) <= 0.0 or not ts.asks_about(info[key][1], stems):
            continue
        for step in (1, 2):
            nxt = (sid, idx + step)
            if nxt not in info:
                break
            if step == 2 or not ts.is_non_answer(info[nxt][1]):
                out.append((key, nxt))
                break
    return out


# ------------------------------------------------------------------- in-memory tiers
def rank_texts(
    query: str,
    texts: Sequence[str],
    *,
    indexes: Sequence[int | None] | None = None,
    names: Sequence[str | None] | None = None,
    params: RankParams = RankParams(),  # noqa: B008 (frozen)
    limit: int | None = None,
) -> list[tuple[int, float, list[str]]]:
    """Rank a small list of texts (cache or snapshot entries) with the tier-3 method.

    The texts themselves are the collection (N, document frequencies, average
    length). ``indexes`` are their message indexes (neighbour context and bridges
    follow them; a text without one has no neighbours; default: list positions, i.e.
    consecutive turns); ``names`` their speakers. Returns ``(position, score in
    [0, 1], matched keywords)``, best first, ties by position: the best ``limit``
    (all if None; bridges are looked for around every candidate either way).
    """
    terms = ts.query_terms(query)
    if not terms or not texts:
        return []
    stems = list(dict.fromkeys(ts.stem(t) for t in terms))
    sfilter = _stem_filter(tuple(stems))
    idxs = list(indexes) if indexes is not None else list(range(len(texts)))
    spk = list(names) if names is not None else [None] * len(texts)
    docs: list[Doc] = []
    by_key: dict[tuple[int, int], int] = {}
    # Known texts that hold no query stem outside a speaker prefix score 0: they
    # count only for the length and the document frequencies (as session_idf would)
    skipped_len = 0
    skipped_df: Counter[str] = Counter()
    qstems = sfilter.stems
    for pos, text in enumerate(texts):
        idx = idxs[pos]
        # group 0: entries with a message index; an entry without one (or a second
        # entry of the same message, e.g. a file's kv_entries) stands alone
        key = (0, int(idx)) if idx is not None and idx >= 0 else (-1 - pos, 0)
        if key in by_key:
            key = (-1 - pos, 0)
        by_key[key] = pos
        text = text or ""
        name = spk[pos]
        base = _base(text, name) if is_profiled(text) else None
        if base is None:
            docs.append(make_doc(pos, key[0], key[1], name, text, only=sfilter))
            continue
        held, length, speaker, prefix_len = base
        shared = held.keys() & qstems
        if not any(held[st] > 0 for st in shared):
            skipped_len += length
            if speaker:
                shared |= speaker & qstems
            skipped_df.update(shared)
            continue
        docs.append(
            Doc(pos, key[0], key[1], name, text, "", held, length, speaker, prefix_len, frozenset(), True)
        )
    n = len(texts)
    avg = (sum(d.length for d in docs) + skipped_len) / n
    idf = session_idf(docs, stems, n, skipped_df)

    def fetch(sid: int, wanted: list[int]) -> list[tuple[int, int, str, str | None]]:
        out = []
        for i in wanted:
            pos = by_key.get((sid, i))
            if pos is not None:
                out.append((pos, i, texts[pos], spk[pos]))
        return out

    hits = rank_candidates(
        docs, query, terms, idf, avg, n if limit is None else limit, fetch, params, bridge_top=n
    )
    return [(h.message_id, h.score, h.matched_keywords) for h in hits]
