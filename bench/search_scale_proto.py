"""Latency of kvcache_cli.store.search_sqlite on a synthetic store (not a test).

Usage: python bench/search_scale_proto.py [--messages 1000000] [--sessions 2000] [--db PATH]

Builds ``messages`` with Zipf-distributed words from a 20,000-word vocabulary
(bulk insert, then ``rebuild`` + ``optimize``), then times per-session and
all-session queries of 2-5 words drawn from the same distribution and prints
p50/p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvcache_cli.store import search_sqlite  # noqa: E402

DDL = [
    "CREATE TABLE sessions (id INTEGER PRIMARY KEY, name TEXT)",
    "CREATE TABLE messages (id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL "
    "REFERENCES sessions(id), message_index INTEGER NOT NULL, role TEXT, name TEXT, "
    "content TEXT, tokens INTEGER, timestamp TEXT, importance REAL, "
    "UNIQUE(session_id, message_index))",
]


def make_vocab(n: int, rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))))
    return sorted(words)


def build(path: str, n_msgs: int, n_sess: int, rng: random.Random) -> tuple[list[str], list[float]]:
    vocab = make_vocab(20000, rng)
    weights = [1.0 / (r + 1) for r in range(len(vocab))]
    cum: list[float] = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    for ddl in DDL + search_sqlite.SCHEMA:
        conn.execute(ddl)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO sessions VALUES (?, ?)", [(s, f"s{s}") for s in range(1, n_sess + 1)])
    per = n_msgs // n_sess
    mid = 0
    batch = []
    names = ["alice", "bob", "user", "assistant"]
    for sid in range(1, n_sess + 1):
        for idx in range(per):
            mid += 1
            nwords = rng.randint(5, 60)
            text = " ".join(rng.choices(vocab, cum_weights=cum, k=nwords))
            name = names[idx % 2 + (2 if sid % 2 else 0)]
            batch.append((mid, sid, idx, "user", name, f"{name}: {text}", nwords, "2024-01-01", 0.5))
            if len(batch) >= 20000:
                conn.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?)", batch)
                batch.clear()
    conn.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?)", batch)
    conn.execute("COMMIT")
    t0 = time.perf_counter()
    conn.execute("BEGIN")
    search_sqlite.rebuild(conn)
    search_sqlite.optimize(conn)
    conn.execute("COMMIT")
    print(f"rebuild+optimize: {time.perf_counter() - t0:.1f} s")
    conn.close()
    return vocab, cum


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--db", default="")
    args = ap.parse_args()
    rng = random.Random(7)
    tmp = tempfile.mkdtemp()
    path = args.db or os.path.join(tmp, "scale.db")
    t0 = time.perf_counter()
    if not os.path.exists(path):
        vocab, cum = build(path, args.messages, args.sessions, rng)
    else:
        rng2 = random.Random(7)
        vocab = make_vocab(20000, rng2)
        cum = []
        acc = 0.0
        for r in range(len(vocab)):
            acc += 1.0 / (r + 1)
            cum.append(acc)
    print(f"store ready in {time.perf_counter() - t0:.1f} s, {os.path.getsize(path) / 1e6:.0f} MB")
    conn = sqlite3.connect(path, isolation_level=None)
    queries = [
        " ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(2, 5))) for _ in range(args.queries)
    ]
    for label, sess in (("per-session", True), ("all-session", False)):
        times: list[float] = []
        for q in queries:
            sid = rng.randint(1, args.sessions) if sess else None
            t = time.perf_counter()
            search_sqlite.search_messages(conn, q, sid, 10)
            times.append((time.perf_counter() - t) * 1000)
        print(
            f"{label:<12} p50 {statistics.median(times):6.2f} ms   p95 {pct(times, 0.95):6.2f} ms"
            f"   max {max(times):6.1f} ms  ({len(times)} queries)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
