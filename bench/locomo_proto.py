"""Prototype LoCoMo retrieval bench for kvcache_cli.store.search_sqlite (plain sqlite3).

Usage: python bench/locomo_proto.py [--ablation] FILE.json [FILE.json ...]

Each conversation is replayed into one session of a temporary database (content
``speaker: text``, timestamp = the session date, message_index = order); each
question (category 5 and questions without evidence left out) is a query against
its session; recall@k = |evidence & top-k dia_ids| / |evidence|. Only ``speaker``,
``text``, ``dia_id`` and the session dates are read from the turns (no
``blip_caption``, ``query``, observations, summaries or events); the QA answers
are never read.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locomo import parse_evidence  # noqa: E402
from locomo_to_conversations import session_numbers  # noqa: E402

from kvcache_cli.retrieval import textsearch  # noqa: E402
from kvcache_cli.store import search_sqlite

KS = (1, 5, 10, 20)
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}

MESSAGES_DDL = [
    "CREATE TABLE sessions (id INTEGER PRIMARY KEY, name TEXT)",
    "CREATE TABLE messages (id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL "
    "REFERENCES sessions(id), message_index INTEGER NOT NULL, role TEXT, name TEXT, "
    "content TEXT, tokens INTEGER, timestamp TEXT, importance REAL, "
    "UNIQUE(session_id, message_index))",
]


def load(conn: sqlite3.Connection, files: Sequence[str]) -> tuple[dict[int, str], list[dict[str, Any]]]:
    """Insert the conversations; return message id -> dia_id and the questions."""
    dia_of: dict[int, str] = {}
    questions: list[dict[str, Any]] = []
    mid = 0
    for sid, path in enumerate(files, start=1):
        conv = json.loads(Path(path).read_text())
        conn.execute("INSERT INTO sessions(id, name) VALUES (?, ?)", (sid, Path(path).stem))
        idx = 0
        rows = []
        for n in session_numbers(conv):
            date = iso_date(conv.get(f"session_{n}_date_time", ""))
            for turn in conv[f"session_{n}"]:
                mid += 1
                content = f"{turn['speaker']}: {turn['text']}"
                rows.append((mid, sid, idx, "user", turn["speaker"], content, 0, date, 0.5))
                dia_of[mid] = str(turn["dia_id"])
                idx += 1
        conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        for qa in conv["qa"]:
            cat = qa.get("category")
            ev = parse_evidence(qa.get("evidence") or [])
            if cat == 5 or not ev:
                continue
            questions.append({"q": qa["question"], "cat": cat, "ev": ev, "sid": sid, "file": path})
    return dia_of, questions


def iso_date(text: str) -> str:
    """'1:56 pm on 8 May, 2023' -> '2023-05-08T13:56:00' (the text itself if unparsable)."""
    from datetime import datetime

    try:
        return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").isoformat()
    except ValueError:
        return text


Retriever = Callable[[sqlite3.Connection, str, int, int], list[int]]


def plain_bm25(conn: sqlite3.Connection, query: str, sid: int, k: int) -> list[int]:
    """Reference: bm25 over `speaker: text`, every query word OR-ed (no stop words)."""
    words = textsearch.tokenize(query)
    match = textsearch.fts5_match(words)
    if match is None:
        return []
    expr = f'sess : "s{sid}" AND content : ({match})'
    rows = conn.execute(
        "SELECT rowid FROM message_fts WHERE message_fts MATCH ? "
        "ORDER BY bm25(message_fts, 0.0, 1.0), rowid LIMIT ?",
        (expr, k),
    ).fetchall()
    return [int(r[0]) for r in rows]


def ours(**kwargs: Any) -> Retriever:
    def run(conn: sqlite3.Connection, query: str, sid: int, k: int) -> list[int]:
        return [h.message_id for h in search_messages_cached(conn, query, sid, k, **kwargs)]

    return run


def search_messages_cached(
    conn: sqlite3.Connection, query: str, sid: int, k: int, **kw: Any
) -> list[search_sqlite.Hit]:
    return search_sqlite.search_messages(conn, query, sid, k, **kw)


def evaluate(
    conn: sqlite3.Connection, dia_of: dict[int, str], questions: list[dict[str, Any]], retr: Retriever
) -> tuple[dict[str, list[float]], float]:
    kmax = max(KS)
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0] * (len(KS) + 1))
    t0 = time.perf_counter()
    for q in questions:
        ids = retr(conn, q["q"], q["sid"], kmax)
        got = [dia_of[i] for i in ids]
        ev = set(q["ev"])
        for key in ("all", f"cat{q['cat']}"):
            row = sums[key]
            for j, k in enumerate(KS):
                row[j] += len(ev & set(got[:k])) / len(ev)
            row[-1] += 1
    elapsed = (time.perf_counter() - t0) / max(1, len(questions))
    table = {key: [v / row[-1] for v in row[:-1]] + [row[-1]] for key, row in sums.items()}
    return table, elapsed


def print_table(name: str, table: dict[str, list[float]], per_q: float) -> None:
    print(f"\n== {name}   ({per_q * 1000:.2f} ms/query)")
    print(f"{'subset':<22}{'n':>5}" + "".join(f"{'R@' + str(k):>8}" for k in KS))
    for key in ["all"] + [f"cat{c}" for c in sorted(CATEGORIES)]:
        if key not in table:
            continue
        row = table[key]
        label = key if key == "all" else f"{key} {CATEGORIES[int(key[3:])]}"
        print(f"{label:<22}{int(row[-1]):>5}" + "".join(f"{v:>8.3f}" for v in row[:-1]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--ablation", action="store_true", help="also run each step on its own")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(os.path.join(tmp, "bench.db"), isolation_level=None)
        for ddl in MESSAGES_DDL + search_sqlite.SCHEMA:
            conn.execute(ddl)
        conn.execute("BEGIN")
        dia_of, questions = load(conn, args.files)
        search_sqlite.rebuild(conn)
        search_sqlite.optimize(conn)
        conn.execute("COMMIT")
        print(f"{len(args.files)} conversations, {len(dia_of)} turns, {len(questions)} questions")

        off: dict[str, Any] = dict(
            context_window=0, speaker_boost=0.0, temporal_boost=0.0, bridges=False, length_b=0.75
        )
        configs: list[tuple[str, Retriever]] = [("reference: plain bm25, all query words OR-ed", plain_bm25)]
        if args.ablation:
            steps = [
                ("1 stop/question words dropped, per-session IDF", {}),
                ("2 + length norm b=0.5", {"length_b": 0.5}),
                ("3 + speaker boost x2", {"speaker_boost": 1.0}),
                ("4 + 'when' -> time-expression boost", {"temporal_boost": 0.3}),
                ("5 + neighbour context (w=3, l=0.5, d=0.8)", {"context_window": 3}),
            ]
            acc: dict[str, Any] = dict(off)
            for name, change in steps:
                acc = {**acc, **change}
                configs.append((name, ours(**acc)))
            configs.append(("6 + bridge turns = kvcache method", ours(**{**acc, "bridges": True})))
            configs.append(("  method without speaker boost", ours(speaker_boost=0.0)))
            configs.append(("  method without context", ours(context_window=0)))
            configs.append(("  method with b=0.75 (FTS5 default)", ours(length_b=0.75)))
        else:
            configs.append(("kvcache method (defaults)", ours()))
        for name, retr in configs:
            table, per_q = evaluate(conn, dia_of, questions, retr)
            print_table(name, table, per_q)
        conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
