"""Ranked keyword retrieval over ``messages`` with PostgreSQL's tsvector + GIN.

Same functions and the same results as :mod:`kvcache_cli.search_sqlite`.

Index
    ``message_search(message_id, session_id, length, tsv)``: one row per message,
    ``tsv`` a ``tsvector`` (GIN index) and ``session_id`` a btree, so a per-session
    query is a bitmap AND of two indexes and never a scan of the whole table. The
    lexemes are the Porter stems of :func:`textsearch.tokenize` (the tokenizer and
    stemmer SQLite's FTS5 index uses, ``porter unicode61 remove_diacritics 2``), with
    their positions, written as a ``tsvector`` literal: PostgreSQL's own ``english``
    configuration stems and drops words differently, and would make the two backends
    find different messages for the same query. ``length`` is the message's token
    count (FTS5 keeps the same figure for BM25's length normalisation).

Queries
    The query's words (:func:`textsearch.query_terms`) are stemmed and OR-ed into a
    ``tsquery`` literal with every lexeme quoted, so any input is safe. Candidates
    are all matches of the session (bounded), else the best by ``ts_rank_cd``; they
    are then scored exactly as on SQLite (BM25 with FTS5's constants, speaker,
    answer type and context, see :mod:`kvcache_cli.search_sqlite`).

Writes use the caller's connection and transaction; nothing here commits.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

from kvcache_cli import search_sqlite as sq
from kvcache_cli import textsearch as ts
from kvcache_cli.search_sqlite import Hit

__all__ = [
    "SCHEMA",
    "TABLE",
    "Hit",
    "PgConnection",
    "delete_messages",
    "delete_session",
    "index_messages",
    "optimize",
    "rebuild",
    "search_messages",
    "tsquery_literal",
    "tsvector_literal",
]

TABLE = "message_search"

#: DDL, to run after the ``messages`` table exists.
SCHEMA: list[str] = [
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    "message_id INTEGER PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE, "
    "session_id INTEGER NOT NULL, "
    "length INTEGER NOT NULL, "
    "tsv TSVECTOR NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_tsv ON {TABLE} USING GIN (tsv)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_session ON {TABLE} (session_id)",
]

_INSERT_BATCH = 200
# tsvector limits: a lexeme < 2 KB, positions 1..16383, at most 256 per lexeme.
_MAX_LEXEME_BYTES = 2000
_MAX_POSITION = 16383
_MAX_POSITIONS = 255


class PgConnection:
    """A psycopg2 connection with ``execute(sql, params)`` (like ``sqlite3.Connection``).

    Each call opens a cursor on the same connection, hence in the caller's
    transaction; the returned cursor has ``fetchall``/``fetchone``.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Any:
        cursor = self.conn.cursor()
        cursor.execute(sql, tuple(parameters) if parameters is not None else None)
        return cursor


def _conn(conn: Any) -> Any:
    return conn if hasattr(conn, "execute") else PgConnection(conn)


def _quote(lexeme: str) -> str:
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


def _usable(lexeme: str) -> bool:
    return bool(lexeme) and len(lexeme.encode("utf-8")) <= _MAX_LEXEME_BYTES


def tsvector_literal(tokens: Sequence[str]) -> str:
    """A ``tsvector`` literal of the Porter stems of ``tokens``, with positions."""
    positions: dict[str, list[int]] = {}
    for pos, stem in enumerate(ts.stem_all(tokens), start=1):
        if not _usable(stem):
            continue
        slot = positions.setdefault(stem, [])
        if len(slot) < _MAX_POSITIONS:
            slot.append(min(pos, _MAX_POSITION))
    return " ".join(
        f"{_quote(stem)}:{','.join(str(p) for p in dict.fromkeys(spots))}"
        for stem, spots in positions.items()
    )


def tsquery_literal(stems: Sequence[str]) -> str | None:
    """``'a' | 'b'`` with every lexeme quoted; ``None`` when nothing is searchable."""
    parts = [_quote(s) for s in dict.fromkeys(stems) if _usable(s)]
    return " | ".join(parts) if parts else None


# ------------------------------------------------------------------------ writes
def index_messages(conn: Any, rows: Iterable[tuple[int, int, str | None]]) -> int:
    """Index ``(message_id, session_id, content)`` rows (re-indexing replaces); returns how many."""
    db = _conn(conn)
    batch: list[tuple[int, int, str | None]] = []
    count = 0

    def flush() -> None:
        if not batch:
            return
        values = ",".join(["(%s, %s, %s, %s::tsvector)"] * len(batch))
        params: list[Any] = []
        for mid, sid, content in batch:
            tokens = ts.tokenize(content or "")
            params.extend((int(mid), int(sid), len(tokens), tsvector_literal(tokens)))
        db.execute(
            f"INSERT INTO {TABLE} (message_id, session_id, length, tsv) VALUES {values} "
            "ON CONFLICT (message_id) DO UPDATE SET session_id = EXCLUDED.session_id, "
            "length = EXCLUDED.length, tsv = EXCLUDED.tsv",
            params,
        )
        batch.clear()

    for row in rows:
        batch.append(row)
        count += 1
        if len(batch) >= _INSERT_BATCH:
            flush()
    flush()
    return count


def delete_session(conn: Any, session_id: int) -> None:
    """Remove a session's messages from the index."""
    _conn(conn).execute(f"DELETE FROM {TABLE} WHERE session_id = %s", (int(session_id),))


def delete_messages(conn: Any, message_ids: Iterable[int]) -> None:
    """Remove some messages from the index."""
    ids = [int(i) for i in message_ids]
    if ids:
        _conn(conn).execute(f"DELETE FROM {TABLE} WHERE message_id = ANY(%s)", (ids,))


def rebuild(conn: Any) -> None:
    """Re-read every message into the index."""
    db = _conn(conn)
    db.execute(f"DELETE FROM {TABLE}")
    last = 0
    while True:
        rows = db.execute(
            "SELECT id, session_id, content FROM messages WHERE id > %s ORDER BY id LIMIT 2000",
            (last,),
        ).fetchall()
        if not rows:
            break
        index_messages(db, rows)
        last = int(rows[-1][0])


def optimize(conn: Any) -> None:
    """Nothing to merge: GIN's pending list is flushed by (auto)vacuum."""
    del conn


# ------------------------------------------------------------------------ search
def _stats(db: Any) -> tuple[int, float]:
    """Rows in the index and the average token count of their messages."""
    n, total = db.execute(f"SELECT count(*), coalesce(sum(length), 0) FROM {TABLE}").fetchone()
    n = int(n)
    return n, (int(total) / n if n > 0 else 1.0)


def _defaults() -> dict[str, Any]:
    """The tuning defaults of the SQLite search (one source of truth for both backends)."""
    return {
        name: p.default
        for name, p in inspect.signature(sq.search_messages).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def search_messages(conn: Any, query: str, session_id: int | None, limit: int, **options: Any) -> list[Hit]:
    """Rank the messages of one session (or all, ``session_id=None``) for ``query``.

    Mirrors :func:`kvcache_cli.search_sqlite.search_messages` step by step (same
    keyword options and defaults, same scores); only the index queries differ.
    """
    opts = {**_defaults(), **options}
    context_window = int(opts.get("context_window", 3))
    context_weight = float(opts.get("context_weight", 0.5))
    context_decay = float(opts.get("context_decay", 0.8))
    speaker_boost = float(opts.get("speaker_boost", 1.0))
    temporal_boost = float(opts.get("temporal_boost", 0.3))
    length_b = float(opts.get("length_b", 0.5))
    candidates = int(opts.get("candidates", 300))
    max_session_matches = int(opts.get("max_session_matches", 3000))
    bridges = bool(opts.get("bridges", True))
    if limit <= 0:
        return []
    db = _conn(conn)
    terms = ts.query_terms(query)
    stems = list(dict.fromkeys(ts.stem(t) for t in terms))
    tsq = tsquery_literal(stems)
    if tsq is None:
        return []
    select = (
        "SELECT m.id, m.session_id, m.message_index, m.name, m.content, m.timestamp "
        f"FROM {TABLE} AS f JOIN messages AS m ON m.id = f.message_id "
        "WHERE {where} {order} LIMIT %s"
    )
    ranked = "ORDER BY ts_rank_cd(f.tsv, %s::tsquery) DESC, f.message_id"
    idf: dict[str, float]
    if session_id is not None:
        where = "f.session_id = %s AND f.tsv @@ %s::tsquery"
        sid = int(session_id)
        rows = db.execute(
            select.format(where=where, order=""), (sid, tsq, max_session_matches + 1)
        ).fetchall()
        if len(rows) > max_session_matches:  # huge session: keep the best by rank
            rows = db.execute(
                select.format(where=where, order=ranked), (sid, tsq, tsq, candidates)
            ).fetchall()
        docs = [sq._make_doc(*r) for r in rows]
        n_rows = db.execute("SELECT count(*) FROM messages WHERE session_id = %s", (sid,)).fetchone()[0]
        idf = {}
        for s in stems:
            df = sum(1 for d in docs if s in d.stems or s in d.speaker_stems)
            idf[s] = ts.bm25_idf(int(n_rows), df)
    else:
        rows = db.execute(
            select.format(where="f.tsv @@ %s::tsquery", order=ranked), (tsq, tsq, candidates)
        ).fetchall()
        docs = [sq._make_doc(*r) for r in rows]
        n_docs, _ = _stats(db)
        dfs = {
            s: int(db.execute(f"SELECT count(*) FROM {TABLE} WHERE tsv @@ %s::tsquery", (q,)).fetchone()[0])
            for s in stems
            if (q := tsquery_literal([s])) is not None
        }
        idf = {s: ts.bm25_idf(n_docs, dfs.get(s, 0)) for s in stems}
    if not docs:
        return []
    _, avg_len = _stats(db)
    temporal_q = temporal_boost > 0 and ts.is_temporal_question(query)

    own: dict[tuple[int, int], float] = {}
    info: dict[tuple[int, int], tuple[int, str]] = {}
    named: set[tuple[int, int]] = set()
    for d in docs:
        score = sq.bm25_terms(d.stems, d.length, idf, avg_len, length_b)
        if score <= 0.0:
            continue  # matched only through the speaker prefix
        key = (d.session_id, d.index)
        if speaker_boost > 0 and d.speaker_stems.intersection(stems):
            named.add(key)
        if temporal_q and ts.has_temporal_expression(ts.tokenize(d.content)):
            score *= 1.0 + temporal_boost
        own[key] = score
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
        top = sorted(combined, key=lambda k: (-combined[k], info[k][0]))[: max(limit, 10)]
        wanted: dict[int, set[int]] = {}
        for sid, idx in top:
            for dist in range(-context_window, context_window + 1):
                if dist and (sid, idx + dist) not in own and idx + dist >= 0:
                    wanted.setdefault(sid, set()).add(idx + dist)
        for sid, idx_set in wanted.items():
            for mid, idx, content, name in db.execute(
                "SELECT id, message_index, content, name FROM messages "
                "WHERE session_id = %s AND message_index = ANY(%s)",
                (sid, sorted(idx_set)),
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

    order = sorted(
        (k for k in combined if combined[k] > 0),
        key=lambda k: (-combined[k], info[k][0]),
    )[:limit]
    ideal = sq.ideal_score(list(idf.values()))
    return [
        Hit(
            message_id=info[key][0],
            session_id=key[0],
            message_index=key[1],
            score=sq.similarity(combined[key], ideal),
            raw_score=combined[key],
            matched_keywords=ts.matched_keywords(terms, info[key][1]),
        )
        for key in order
    ]
