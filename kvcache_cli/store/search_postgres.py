"""Ranked keyword retrieval over ``messages`` with PostgreSQL's tsvector + GIN.

Same functions and the same results as :mod:`kvcache_cli.store.search_sqlite`.

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
    are then scored by the one backend-neutral implementation,
    :func:`kvcache_cli.retrieval.ranking.rank_candidates`, with the same statistics as on SQLite
    (per-session N, document frequencies and average length for a per-session query).

Writes use the caller's connection and transaction; nothing here commits.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

from kvcache_cli.retrieval import textsearch as ts
from kvcache_cli.retrieval.ranking import Hit, make_doc, rank_candidates, rank_params, session_idf
from kvcache_cli.store import search_sqlite as sq

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
    """The candidate options of the SQLite search and their defaults (one source for both backends)."""
    return {
        name: p.default
        for name, p in inspect.signature(sq.search_messages).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _session_stats(db: Any, session_id: int) -> tuple[int, float]:
    """One session's indexed rows and their average token count (btree on session_id)."""
    n, total = db.execute(
        f"SELECT count(*), coalesce(sum(length), 0) FROM {TABLE} WHERE session_id = %s", (int(session_id),)
    ).fetchone()
    n = int(n)
    return n, (int(total) / n if n > 0 and int(total) > 0 else 1.0)


def search_messages(conn: Any, query: str, session_id: int | None, limit: int, **options: Any) -> list[Hit]:
    """Rank the messages of one session (or all, ``session_id=None``) for ``query``.

    Finds the candidates and statistics with PostgreSQL, then scores them with
    :func:`kvcache_cli.retrieval.ranking.rank_candidates`, as the SQLite search does (same
    keyword options and defaults, same scores).
    """
    opts = _defaults()
    params = rank_params({k: v for k, v in options.items() if k not in opts})
    opts.update((k, v) for k, v in options.items() if k in opts)
    candidates = int(opts["candidates"])
    max_session_matches = int(opts["max_session_matches"])
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
    sfilter = ts.StemFilter(stems)
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
        docs = [make_doc(r[0], r[1], r[2], r[3], r[4], r[5], only=sfilter) for r in rows]
        n_rows = db.execute("SELECT count(*) FROM messages WHERE session_id = %s", (sid,)).fetchone()[0]
        idf = session_idf(docs, stems, int(n_rows))
        _, avg_len = _session_stats(db, sid)
    else:
        rows = db.execute(
            select.format(where="f.tsv @@ %s::tsquery", order=ranked), (tsq, tsq, candidates)
        ).fetchall()
        docs = [make_doc(r[0], r[1], r[2], r[3], r[4], r[5], only=sfilter) for r in rows]
        n_docs, avg_len = _stats(db)
        dfs = {
            s: int(db.execute(f"SELECT count(*) FROM {TABLE} WHERE tsv @@ %s::tsquery", (q,)).fetchone()[0])
            for s in stems
            if (q := tsquery_literal([s])) is not None
        }
        idf = {s: ts.bm25_idf(n_docs, dfs.get(s, 0)) for s in stems}
    if not docs:
        return []

    def fetch(sid: int, idxs: list[int]) -> list[Any]:
        rows: list[Any] = db.execute(
            "SELECT id, message_index, content, name FROM messages "
            "WHERE session_id = %s AND message_index = ANY(%s)",
            (sid, idxs),
        ).fetchall()
        return rows

    return rank_candidates(docs, query, terms, idf, avg_len, limit, fetch, params)
