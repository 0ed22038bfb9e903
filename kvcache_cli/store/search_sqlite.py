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
       counted as a mention of the name; times ``(held / best held) ** coverage``
       (coordination: the share of the query's IDF a turn holds, relative to the
       best-covering candidate);
    4. answer type: for a "when" question a turn with a time expression gets
       ``* (1 + temporal_boost)``; query-adjacent word pairs near each other in the
       turn add a pseudo-term; a turn whose date fits a date named in the question
       gets ``* (1 + date_boost)`` (all in :func:`ranking.rank_candidates`);
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

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from kvcache_cli.retrieval import ranking as _ranking
from kvcache_cli.retrieval import textsearch as ts
from kvcache_cli.retrieval.ranking import BM25_B as BM25_B  # re-exported (one scoring implementation)
from kvcache_cli.retrieval.ranking import BM25_K1 as BM25_K1
from kvcache_cli.retrieval.ranking import Doc, make_doc, rank_candidates
from kvcache_cli.retrieval.ranking import Hit as Hit
from kvcache_cli.retrieval.ranking import bm25_terms as bm25_terms
from kvcache_cli.retrieval.ranking import ideal_score as ideal_score
from kvcache_cli.retrieval.ranking import similarity as similarity

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


_INSERT_BATCH = 200


class Connectionish(Protocol):
    """What we need from a DB-API connection (sqlite3.Connection fits)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...


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
def _row_count(conn: Connectionish) -> int:
    """Rows in the index, read from the FTS5 averages record (no table scan)."""
    rows = conn.execute(f"SELECT block FROM {FTS_TABLE}_data WHERE id = 1").fetchall()
    if not rows or rows[0][0] is None:
        return 0
    vals = _varints(bytes(rows[0][0]), 1)
    return vals[0] if vals else 0


def _avg_len(conn: Connectionish) -> float:
    """Average token count of ``content`` over the index (FTS5 averages record)."""
    rows = conn.execute(f"SELECT block FROM {FTS_TABLE}_data WHERE id = 1").fetchall()
    if not rows or rows[0][0] is None:
        return 1.0
    vals = _varints(bytes(rows[0][0]), 3)
    if len(vals) < 3 or vals[0] <= 0:
        return 1.0
    return vals[2] / vals[0]


def _session_avg_len(conn: Connectionish, session_id: int) -> float:
    """Average token count of ``content`` over one session's rows (FTS5 docsize records).

    Per-session statistics keep a session's ranking independent of what other
    sessions hold. The docsize record of a row is one varint per column
    (``sess``, ``content``); a session has at most a few thousand rows.
    """
    rows = conn.execute(
        f"SELECT d.sz FROM messages AS m JOIN {FTS_TABLE}_docsize AS d ON d.id = m.id WHERE m.session_id = ?",
        (int(session_id),),
    ).fetchall()
    total = 0
    for (blob,) in rows:
        vals = _varints(bytes(blob), 2)
        if len(vals) == 2:
            total += vals[1]
    return total / len(rows) if rows and total > 0 else 1.0


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
) -> tuple[list[Doc], dict[str, float]]:
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
    return [make_doc(r[0], r[1], r[2], r[3], r[4], r[5], only=sfilter) for r in rows], idf


def search_messages(
    conn: Connectionish,
    query: str,
    session_id: int | None,
    limit: int,
    *,
    candidates: int = 300,
    max_session_matches: int = 3000,
    session_avg_len: float | None = None,
    **rank_options: Any,
) -> list[Hit]:
    """Rank the messages of one session (or all, ``session_id=None``) for ``query``.

    Any text is accepted; a query with nothing searchable gives ``[]``. Results are
    ordered by ``raw_score`` descending, ties by message id ascending. ``rank_options``
    are :class:`ranking.RankParams` fields (its defaults otherwise).
    """
    params = _ranking.rank_params(rank_options)
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
        if candidates >= max_session_matches:
            # the same rows as below in one query: all matches if at most
            # max_session_matches, else FTS5's best ``candidates`` (order is irrelevant)
            rows = conn.execute(base_sql.format(order=ranked_order), (expr, candidates)).fetchall()
        else:
            rows = conn.execute(base_sql.format(order=""), (expr, max_session_matches + 1)).fetchall()
        if candidates < max_session_matches < len(rows):  # huge session: keep FTS5's best
            rows = conn.execute(base_sql.format(order=ranked_order), (expr, candidates)).fetchall()
        docs = [make_doc(r[0], r[1], r[2], r[3], r[4], r[5], only=sfilter) for r in rows]
        n_rows = conn.execute(
            "SELECT count(*) FROM messages WHERE session_id = ?", (int(session_id),)
        ).fetchall()[0][0]
        idf = _ranking.session_idf(docs, stems, int(n_rows))
    else:
        docs, idf = _all_session_candidates(conn, terms, sfilter, base_sql, ranked_order, candidates)
    if not docs:
        return []
    # session_avg_len: the caller's own exact _session_avg_len (a replay keeps it up to date)
    if session_id is not None:
        avg_len = session_avg_len if session_avg_len is not None else _session_avg_len(conn, session_id)
    else:
        avg_len = _avg_len(conn)

    def fetch(sid: int, idxs: list[int]) -> list[Any]:
        rows: list[Any] = []
        for start in range(0, len(idxs), 500):
            chunk = idxs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += conn.execute(
                "SELECT id, message_index, content, name FROM messages "
                f"WHERE session_id = ? AND message_index IN ({marks})",
                [sid, *chunk],
            ).fetchall()
        return rows

    return rank_candidates(docs, query, terms, idf, avg_len, limit, fetch, params)


# ------------------------------------------------------------------- in-memory tier
def rank_texts(
    query: str,
    texts: Sequence[str],
    *,
    indexes: Sequence[int | None] | None = None,
    names: Sequence[str | None] | None = None,
) -> list[tuple[int, float, list[str]]]:
    """Rank in-memory texts (tiers 1-2) with the tier-3 method: :func:`ranking.rank_texts`."""
    return _ranking.rank_texts(query, texts, indexes=indexes, names=names)
