"""Ranked keyword retrieval over the ``messages`` table with SQLite FTS5.

Index
    ``message_fts`` is an *external-content* FTS5 table over the view
    ``message_fts_src`` (``messages`` plus a per-session token ``sess = 's<id>'``), so
    the text is stored once. Two columns: ``sess`` (indexed, one token per row) and
    ``content``. A per-session query is ``sess : "s42" AND content : (...)``: FTS5
    intersects the query's doclists with the session token's doclist, so its cost
    follows the matches, not the size of the whole table (an UNINDEXED column or a
    join on ``messages.session_id`` would filter after matching everywhere).

Ranking (see docs/retrieval.md for the measurements)
    1. query words: tokens minus stop words and question words, each quoted, OR-ed;
    2. candidates: per session, every matching turn (at most ``max_session_matches``,
       else FTS5's ``bm25()`` best ``candidates``); all sessions, FTS5's best
       ``candidates`` for the query's rarer words (MaxScore-style, see
       :func:`_all_session_candidates`);
    3. own score: BM25 recomputed in Python (k1 = 1.2, ``b = length_b = 0.5``; IDF
       over the session for a per-session query), the ``speaker:`` prefix not
       counted as a mention of the name;
    4. answer type: for a "when" question a turn with a time expression gets
       ``* (1 + temporal_boost)``;
    5. context: ``combined = own + context_weight * sum(decay**(d-1) * own(i +- d))``
       over neighbours ``d = 1..context_window`` of the same session; neighbours of
       the best turns that match nothing themselves enter on context alone
       ("bridge" turns, e.g. "Yes, last Friday!" answering the previous turn);
    6. speaker: a turn whose speaker (``messages.name``) is named in the query,
       bridge or not, gets ``combined * (1 + speaker_boost)``;
    7. ``Hit.score`` maps ``combined`` into ``[0, 1]`` (see :func:`ideal_score`).

Writes use the caller's connection and transaction; nothing here commits.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvcache_cli import textsearch as ts

__all__ = [
    "FTS_TABLE",
    "SCHEMA",
    "Hit",
    "delete_messages",
    "delete_session",
    "index_messages",
    "optimize",
    "rank_texts",
    "rebuild",
    "search_messages",
]

FTS_TABLE = "message_fts"
TOKENIZER = "porter unicode61 remove_diacritics 2"

#: DDL, to run after the ``messages`` table exists.
SCHEMA: list[str] = [
    "CREATE VIEW IF NOT EXISTS message_fts_src AS "
    "SELECT id, session_id, 's' || session_id AS sess, content FROM messages",
    "CREATE VIRTUAL TABLE IF NOT EXISTS message_fts USING fts5("
    "sess, content, content='message_fts_src', content_rowid='id', "
    f"tokenize='{TOKENIZER}')",
]

# BM25 constants of FTS5's bm25() (fixed in SQLite's source).
BM25_K1 = 1.2
BM25_B = 0.75

_INSERT_BATCH = 200


class Connectionish(Protocol):
    """What we need from a DB-API connection (sqlite3.Connection fits)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...


@dataclass(frozen=True)
class Hit:
    """One ranked message."""

    message_id: int
    session_id: int
    message_index: int
    score: float  # in [0, 1], monotone in raw_score for one query
    raw_score: float  # combined BM25 (own + context), larger is better
    matched_keywords: list[str] = field(default_factory=list)


def _sess_token(session_id: int) -> str:
    return f"s{int(session_id)}"


# ------------------------------------------------------------------------ writes
def index_messages(conn: Connectionish, rows: Iterable[tuple[int, int, str | None]]) -> int:
    """Index ``(message_id, session_id, content)`` rows; returns how many.

    ``content`` must be exactly ``messages.content`` of that row (external content:
    the same values are needed to delete the row from the index later).
    """
    batch: list[tuple[int, int, str | None]] = []
    count = 0

    def flush() -> None:
        if not batch:
            return
        values = ",".join(["(?, ?, ?)"] * len(batch))
        params: list[Any] = []
        for mid, sid, content in batch:
            params.extend((int(mid), _sess_token(sid), content))
        conn.execute(f"INSERT INTO {FTS_TABLE}(rowid, sess, content) VALUES {values}", params)
        batch.clear()

    for row in rows:
        batch.append(row)
        count += 1
        if len(batch) >= _INSERT_BATCH:
            flush()
    flush()
    return count


def delete_session(conn: Connectionish, session_id: int) -> None:
    """Remove a session's messages from the index. Call BEFORE deleting the rows."""
    conn.execute(
        f"INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, sess, content) "
        "SELECT 'delete', id, sess, content FROM message_fts_src WHERE session_id = ?",
        (int(session_id),),
    )


def delete_messages(conn: Connectionish, message_ids: Iterable[int]) -> None:
    """Remove some messages from the index. Call BEFORE deleting the rows."""
    ids = [int(i) for i in message_ids]
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        conn.execute(
            f"INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, sess, content) "
            f"SELECT 'delete', id, sess, content FROM message_fts_src WHERE id IN ({marks})",
            chunk,
        )


def rebuild(conn: Connectionish) -> None:
    """Re-read every message into the index (after a bulk insert into ``messages``)."""
    conn.execute(f"INSERT INTO {FTS_TABLE}({FTS_TABLE}) VALUES ('rebuild')")


def optimize(conn: Connectionish) -> None:
    """Merge the index b-trees into one (after a bulk import; slow on big stores)."""
    conn.execute(f"INSERT INTO {FTS_TABLE}({FTS_TABLE}) VALUES ('optimize')")


# ------------------------------------------------------------------------ scoring
def _bm25_norm(doc_len: float, avg_len: float) -> float:
    """BM25 tf factor for tf = 1: ``(k1 + 1) / (1 + k1 * (1 - b + b * dl / avgdl))``."""
    avg = avg_len if avg_len > 0 else 1.0
    return (BM25_K1 + 1.0) / (1.0 + BM25_K1 * (1.0 - BM25_B + BM25_B * doc_len / avg))


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


def _row_count(conn: Connectionish) -> int:
    """Rows in the index, read from the FTS5 averages record (no table scan)."""
    rows = conn.execute(f"SELECT block FROM {FTS_TABLE}_data WHERE id = 1").fetchall()
    if not rows or rows[0][0] is None:
        return 0
    vals = _varints(bytes(rows[0][0]), 1)
    return vals[0] if vals else 0


@dataclass
class _Doc:
    message_id: int
    session_id: int
    index: int
    name: str | None
    content: str
    day: str
    stems: Counter[str]
    length: int
    speaker_stems: frozenset[str]


# Text profiles: a replay queries the same session's messages thousands of times, so a
# text seen twice keeps its tokens and full stem counts (bounded), and a candidate then
# costs a few dict lookups instead of a pass over its tokens. A text seen once is not
# stemmed whole (the cold path, one CLI call, stays as cheap as StemFilter makes it).
_PROFILES: dict[str, tuple[list[str], Counter[str]]] = {}
_SEEN_ONCE: set[str] = set()
_PROFILE_MAX = 50_000


def _profile(text: str, remember: bool = False) -> tuple[list[str], Counter[str]] | None:
    """``(tokens, stem counts)`` of ``text`` if known (or ``remember``); else None, noted.

    The returned objects are shared: callers must not modify them.
    """
    prof = _PROFILES.get(text)
    if prof is not None:
        return prof
    if not remember and text not in _SEEN_ONCE:
        if len(_SEEN_ONCE) >= _PROFILE_MAX:
            _SEEN_ONCE.clear()
        _SEEN_ONCE.add(text)
        return None
    tokens = ts.tokenize(text)
    prof = (tokens, Counter(ts.stem_all(tokens)))
    if len(_PROFILES) >= _PROFILE_MAX:
        _PROFILES.clear()
    _PROFILES[text] = prof
    return prof


_NAMES: dict[str, tuple[list[str], list[str]]] = {}


def _name_profile(name: str) -> tuple[list[str], list[str]]:
    """A speaker name's tokens and their stems (few distinct names: cached)."""
    prof = _NAMES.get(name)
    if prof is None:
        tokens = ts.tokenize(name)
        prof = (tokens, ts.stem_all(tokens))
        if len(_NAMES) >= 10_000:
            _NAMES.clear()
        _NAMES[name] = prof
    return prof


def _matched(terms: Sequence[str], text: str) -> list[str]:
    """``ts.matched_keywords`` through the profile cache when the text is known."""
    prof = _PROFILES.get(text)
    if prof is None:
        return ts.matched_keywords(terms, text)
    return [t for t in terms if ts.stem(t) in prof[1]]


def _make_doc(
    mid: int,
    sid: int,
    idx: int,
    name: str | None,
    content: str | None,
    stamp: Any = None,
    only: ts.StemFilter | None = None,
) -> _Doc:
    """A candidate: counts of the stems in ``only`` (all stems if None) and length.

    The ``speaker:`` prefix counts in the length (as FTS5 sees it) but not as a
    mention of the speaker's name.
    """
    text = content or ""
    prof = _profile(text)
    if prof is not None:
        tokens, full = prof
        if only is not None:  # the same counts as only.counts(tokens)
            stems = Counter({st: full[st] for st in only.stems if st in full})
        else:
            stems = Counter(full)
    else:
        tokens = ts.tokenize(text)
        stems = only.counts(tokens) if only is not None else Counter(ts.stem_all(tokens))
    speaker: frozenset[str] = frozenset()
    if name:
        name_tokens, name_stems = _name_profile(name)
        speaker = frozenset(name_stems)
        if ":" in text[: len(name) + 2] and tokens[: len(name_tokens)] == name_tokens:
            for st in name_stems:
                if stems.get(st, 0) > 0:
                    stems[st] -= 1
    return _Doc(mid, sid, idx, name, text, str(stamp or "")[:10], stems, len(tokens), speaker)


def bm25_terms(
    doc_stems: Counter[str], doc_len: int, idf: dict[str, float], avg_len: float, b: float
) -> float:
    """FTS5's BM25 of one document for the stems in ``idf`` (k1 = 1.2)."""
    score = 0.0
    norm = BM25_K1 * (1.0 - b + b * doc_len / (avg_len if avg_len > 0 else 1.0))
    for s, w in idf.items():
        tf = doc_stems.get(s, 0)
        if tf > 0:
            score += w * tf * (BM25_K1 + 1.0) / (tf + norm)
    return score


def _avg_len(conn: Connectionish) -> float:
    """Average token count of ``content`` over the index (FTS5 averages record)."""
    rows = conn.execute(f"SELECT block FROM {FTS_TABLE}_data WHERE id = 1").fetchall()
    if not rows or rows[0][0] is None:
        return 1.0
    vals = _varints(bytes(rows[0][0]), 3)
    if len(vals) < 3 or vals[0] <= 0:
        return 1.0
    return vals[2] / vals[0]


def _varints(blob: bytes, count: int) -> list[int]:
    out: list[int] = []
    pos = 0
    while pos < len(blob) and len(out) < count:
        value = 0
        for i in range(9):
            if pos >= len(blob):
                break
            byte = blob[pos]
            pos += 1
            if i == 8:
                value = (value << 8) | byte
                break
            value = (value << 7) | (byte & 0x7F)
            if not byte & 0x80:
                break
        out.append(value)
    return out


def _capped_df(conn: Connectionish, term: str, cap: int) -> int:
    """Rows whose content has ``term``, counted up to ``cap`` (cost O(min(df, cap)))."""
    expr = f"content : ({ts.fts5_match([term])})"
    rows = conn.execute(
        f"SELECT count(*) FROM (SELECT 1 FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? LIMIT ?)",
        (expr, cap),
    ).fetchall()
    return int(rows[0][0])


def _all_session_candidates(
    conn: Connectionish,
    terms: Sequence[str],
    sfilter: ts.StemFilter,
    base_sql: str,
    ranked_order: str,
    candidates: int,
) -> tuple[list[_Doc], dict[str, float]]:
    """Candidates and IDF over the whole index, MaxScore-style.

    Ranking every row that has a common word would cost O(rows) (FTS5 scores every
    match before its LIMIT). Words in more than ``cap = max(1000, N / 50)`` rows
    ("common") are left out of the candidate query when the query has rarer
    words: such a word adds at most ``idf * (k1 + 1)``, with ``idf <= ln(50)``, to a
    row, and the candidates are re-scored with every word. Common words' IDF is
    taken at ``df = cap`` (an upper bound; the exact count would cost O(df)).
    A query of common words only is run as their AND first, then as their OR.
    """
    n_docs = _row_count(conn)
    cap = max(1000, n_docs // 50)
    rare: list[str] = []
    df: dict[str, int] = {}
    for t in terms:
        st = ts.stem(t)
        count = _capped_df(conn, t, cap)
        df[st] = min(df.get(st, count), count) if st in df else count
        if count < cap:
            rare.append(t)
    idf = {st: ts.bm25_idf(n_docs, d) for st, d in df.items()}
    if rare:
        exprs = [f"content : ({ts.fts5_match(rare)})"]
    else:
        exprs = [
            "content : (" + " AND ".join(f"({ts.fts5_match([t])})" for t in terms) + ")",
            f"content : ({ts.fts5_match(terms)})",
        ]
    rows: list[Any] = []
    for expr in exprs:
        rows = conn.execute(base_sql.format(order=ranked_order), (expr, candidates)).fetchall()
        if rows:
            break
    return [_make_doc(r[0], r[1], r[2], r[3], r[4], r[5], only=sfilter) for r in rows], idf


def search_messages(
    conn: Connectionish,
    query: str,
    session_id: int | None,
    limit: int,
    *,
    context_window: int = 3,
    context_weight: float = 0.5,
    context_decay: float = 0.8,
    speaker_boost: float = 1.0,
    temporal_boost: float = 0.3,
    length_b: float = 0.5,
    candidates: int = 300,
    max_session_matches: int = 3000,
    bridges: bool = True,
) -> list[Hit]:
    """Rank the messages of one session (or all, ``session_id=None``) for ``query``.

    Any text is accepted; a query with nothing searchable gives ``[]``. Results are
    ordered by ``raw_score`` descending, ties by message id ascending.
    """
    if limit <= 0:
        return []
    terms = ts.query_terms(query)
    match = ts.fts5_match(terms)
    if match is None:
        return []
    expr = f"content : ({match})"
    stems = list(dict.fromkeys(ts.stem(t) for t in terms))
    sfilter = ts.StemFilter(stems)
    base_sql = (
        "SELECT m.id, m.session_id, m.message_index, m.name, m.content, m.timestamp "
        f"FROM (SELECT rowid AS rid FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? {{order}} "
        "LIMIT ?) AS c JOIN messages AS m ON m.id = c.rid"
    )
    ranked_order = f"ORDER BY bm25({FTS_TABLE}, 0.0, 1.0), rowid"
    rows: list[Any] = []
    idf: dict[str, float]
    if session_id is not None:
        # every match of the session (bounded); IDF over the session itself
        expr = f'sess : "{_sess_token(session_id)}" AND {expr}'
        rows = conn.execute(base_sql.format(order=""), (expr, max_session_matches + 1)).fetchall()
        if len(rows) > max_session_matches:  # huge session: keep FTS5's best
            rows = conn.execute(base_sql.format(order=ranked_order), (expr, candidates)).fetchall()
        docs = [_make_doc(r[0], r[1], r[2], r[3], r[4], r[5], only=sfilter) for r in rows]
        n_rows = conn.execute(
            "SELECT count(*) FROM messages WHERE session_id = ?", (int(session_id),)
        ).fetchall()[0][0]
        idf = {}
        for s in stems:
            df = sum(1 for d in docs if s in d.stems or s in d.speaker_stems)
            idf[s] = ts.bm25_idf(int(n_rows), df)
    else:
        docs, idf = _all_session_candidates(conn, terms, sfilter, base_sql, ranked_order, candidates)
    if not docs:
        return []
    avg_len = _avg_len(conn)
    temporal_q = temporal_boost > 0 and ts.is_temporal_question(query)

    own: dict[tuple[int, int], float] = {}
    info: dict[tuple[int, int], tuple[int, str]] = {}
    named: set[tuple[int, int]] = set()
    for d in docs:
        sc = bm25_terms(d.stems, d.length, idf, avg_len, length_b)
        if sc <= 0.0:
            continue  # matched only through the speaker prefix
        key = (d.session_id, d.index)
        if speaker_boost > 0 and d.speaker_stems.intersection(stems):
            named.add(key)
        if temporal_q and ts.has_temporal_expression(ts.tokenize(d.content)):
            sc *= 1.0 + temporal_boost
        own[key] = sc
        info[key] = (d.message_id, d.content)

    def context(key: tuple[int, int]) -> float:
        sid, idx = key
        total = 0.0
        for dist in range(1, context_window + 1):
            w = context_decay ** (dist - 1)
            total += w * (own.get((sid, idx - dist), 0.0) + own.get((sid, idx + dist), 0.0))
        return total

    use_ctx = context_window > 0 and context_weight > 0
    combined = {k: v + (context_weight * context(k) if use_ctx else 0.0) for k, v in own.items()}

    if bridges and use_ctx and combined:
        # neighbours with no keyword of their own, around the best candidates
        top = sorted(combined, key=lambda k: (-combined[k], info[k][0]))[: max(limit, 10)]
        wanted: dict[int, set[int]] = {}
        for sid, idx in top:
            for dist in range(-context_window, context_window + 1):
                if dist and (sid, idx + dist) not in own and idx + dist >= 0:
                    wanted.setdefault(sid, set()).add(idx + dist)
        for sid, idx_set in wanted.items():
            idxs = sorted(idx_set)
            for start in range(0, len(idxs), 500):
                chunk = idxs[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for mid, idx, content, name in conn.execute(
                    "SELECT id, message_index, content, name FROM messages "
                    f"WHERE session_id = ? AND message_index IN ({marks})",
                    [sid, *chunk],
                ).fetchall():
                    key = (sid, int(idx))
                    info[key] = (int(mid), content or "")
                    combined[key] = context_weight * context(key)
                    if name and speaker_boost > 0:
                        if frozenset(ts.stem_all(ts.tokenize(name))).intersection(stems):
                            named.add(key)

    if speaker_boost > 0:
        for key in named:
            combined[key] *= 1.0 + speaker_boost

    ranked = sorted(
        (k for k in combined if combined[k] > 0),
        key=lambda k: (-combined[k], info[k][0]),
    )[:limit]
    ideal = ideal_score(list(idf.values()))
    hits: list[Hit] = []
    for key in ranked:
        mid, content = info[key]
        raw = combined[key]
        hits.append(
            Hit(
                message_id=mid,
                session_id=key[0],
                message_index=key[1],
                score=similarity(raw, ideal),
                raw_score=raw,
                matched_keywords=_matched(terms, content),
            )
        )
    return hits


# ------------------------------------------------------------------- in-memory tier
def rank_texts(
    query: str,
    texts: Sequence[str],
    *,
    context_window: int = 0,
    context_weight: float = 0.3,
    context_decay: float = 0.5,
) -> list[tuple[int, float, list[str]]]:
    """BM25-rank a small list of texts (cache or snapshot entries) in pure Python.

    Same tokenizer and Porter stemmer as the index, FTS5's BM25 (k1 = 1.2,
    b = 0.75, IDF floored at 1e-6) with the statistics of ``texts`` themselves.
    Returns ``(index, score in [0, 1], matched keywords)`` for texts that match,
    best first, ties by index. ``context_window > 0`` adds neighbours' scores as in
    :func:`search_messages` (for texts that are consecutive turns).
    """
    terms = ts.query_terms(query)
    if not terms or not texts:
        return []
    stems = list(dict.fromkeys(ts.stem(t) for t in terms))
    sfilter = ts.StemFilter(stems)
    docs: list[Counter[str]] = []
    lengths: list[int] = []
    for text in texts:
        prof = _profile(text)  # cache/snapshot entries recur turn after turn
        if prof is not None:
            full = prof[1]
            docs.append(Counter({st: full[st] for st in stems if st in full}))
            lengths.append(len(prof[0]))
        else:
            toks = ts.tokenize(text)
            docs.append(sfilter.counts(toks))
            lengths.append(len(toks))
    n = len(docs)
    avg = (sum(lengths) / n) if n else 1.0
    idf = {s: ts.bm25_idf(n, sum(1 for d in docs if s in d)) for s in stems}
    own: list[float] = []
    for d, dl in zip(docs, lengths, strict=True):
        score = 0.0
        for s in stems:
            tf = d.get(s, 0)
            if tf:
                denom = tf + BM25_K1 * (1.0 - BM25_B + BM25_B * dl / (avg or 1.0))
                score += idf[s] * tf * (BM25_K1 + 1.0) / denom
        own.append(score)
    combined = list(own)
    if context_window > 0 and context_weight > 0:
        for i in range(n):
            ctx = 0.0
            for dd in range(1, context_window + 1):
                w = context_decay ** (dd - 1)
                if i - dd >= 0:
                    ctx += w * own[i - dd]
                if i + dd < n:
                    ctx += w * own[i + dd]
            combined[i] = own[i] + context_weight * ctx
    ideal = ideal_score(list(idf.values()))
    order = sorted((i for i in range(n) if own[i] > 0), key=lambda i: (-combined[i], i))
    return [(i, similarity(combined[i], ideal), _matched(terms, texts[i])) for i in order]
