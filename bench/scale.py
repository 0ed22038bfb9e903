"""Retrieval latency at scale: 1,000,000 messages in 2,000 sessions (not a test).

Usage::

    python bench/scale.py [--messages 1000000] [--sessions 2000] [--db PATH|postgresql://...]
                          [--queries 300] [--keep] [--json]

1. Text: ``bench/gen_sharegpt.py`` (deterministic ShareGPT JSON Lines, alternating
   human/gpt turns of 8..72 words from a Zipf vocabulary: English function words and
   common words first, then 20,000 words; cached under ``$TMPDIR/kvbench-data``).
2. Store: the project's own bulk import path (``importer.import_file``, what
   ``kvcache import`` runs), into a fresh SQLite file (or ``--db``); with ``--keep``
   and an existing store of the right size the import is skipped.
3. In-process latency of ``KVCacheManager.retrieve`` (the code ``kvcache retrieve``
   runs, keyword_only): per-session queries (all tiers of a random session) and
   all-session queries (``--all-sessions``), p50 / p95 / max in ms. Queries are
   questions built from 2-4 words of a random stored message of that session
   ("what did we say about W1 W2 W3?"), so they match like real ones. Per-session
   queries also report their CPU time (``time.process_time``), which a loaded machine
   inflates far less than wall time.
4. The wall time of ``kvcache retrieve SESSION QUERY --json`` (and ``--all-sessions``)
   as a subprocess (cold process: interpreter start, imports, store open, query), median
   of 7 runs. The subprocess runs the package of this script's checkout (``PYTHONPATH``),
   the same code as the in-process queries, not whichever one is installed.

To compare two checkouts, run each one's own script on one kept store, alternated:
``PYTHONPATH=CHECKOUT python -P CHECKOUT/bench/scale.py --db STORE --keep --json``;
``queries`` (count, sessions, digest) shows that both asked the same questions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))

from bench import gen_sharegpt  # noqa: E402
from bench._common import KVCACHE, bench_env  # noqa: E402
from kvcache_cli.config import Config  # noqa: E402
from kvcache_cli.services.importing import import_file  # noqa: E402
from kvcache_cli.services.manager import KVCacheManager  # noqa: E402
from kvcache_cli.store.backend import open_store  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(ms, 0.5), 2),
        "p95_ms": round(pct(ms, 0.95), 2),
        "max_ms": round(max(ms, default=0.0), 2),
        "mean_ms": round(statistics.fmean(ms) if ms else 0.0, 2),
        "n": len(ms),
    }


def make_queries(store_db: Any, n: int, sessions: int, rng: random.Random) -> list[tuple[str, str]]:
    """(session key, question) pairs from words of random stored messages."""
    from kvcache_cli.retrieval.textsearch import query_terms

    out: list[tuple[str, str]] = []
    while len(out) < n:
        key = f"conv-{rng.randint(1, sessions)}"
        row = store_db.execute_sql(
            "SELECT m.content FROM messages m JOIN sessions s ON s.id = m.session_id "
            "WHERE s.key = ? AND m.message_index = ?",
            (key, rng.randint(0, 50)),
        ).fetchone()
        if not row:
            continue
        words = [w for w in query_terms(row[0]) if len(w) > 2]
        if len(words) < 2:
            continue
        pick = rng.sample(words, min(len(words), rng.randint(2, 4)))
        out.append((key, f"What did we say about {' '.join(pick)}?"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--db", default=None, help="SQLite path or postgresql:// URL (default: temp file)")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the --db store")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="kvscale-")
    db = args.db or os.path.join(tmp, "scale.db")
    report: dict[str, Any] = {"messages": args.messages, "sessions": args.sessions, "db": db.split("@")[-1]}

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    t0 = time.perf_counter()
    data = gen_sharegpt.cached(args.messages, args.sessions)
    report["generate_seconds"] = round(time.perf_counter() - t0, 1)
    store = open_store(db)
    have = store.db.execute_sql("SELECT count(*) FROM messages").fetchone()[0]
    if have < args.messages:
        say(f"importing {args.messages:,} messages in {args.sessions:,} sessions from {data} ...")
        t0 = time.perf_counter()
        res = import_file(store, data)
        report["import_seconds"] = round(time.perf_counter() - t0, 1)
        report["imported"] = res.messages_added
        say(f"  import: {report['import_seconds']} s ({res.messages_added:,} messages)")
    else:
        report["import_seconds"] = None
        say(f"reusing {have:,} stored messages")
    if store.is_sqlite:
        report["db_bytes"] = os.path.getsize(db)

    rng = random.Random(42)
    queries = make_queries(store.db, args.queries, args.sessions, rng)
    report["queries"] = {
        "n": len(queries),
        "sessions": len({key for key, _ in queries}),
        "digest": hashlib.sha256(json.dumps(queries).encode()).hexdigest()[:12],
    }
    config = Config()
    config.cache.retrieval_strategy = "keyword_only"
    manager = KVCacheManager(store, config, None)
    for key, q in queries[:10]:  # warm the page cache and the stemmer
        manager.retrieve(key, q, (1, 2, 3), 10)
    per: list[float] = []
    per_cpu: list[float] = []  # CPU time: less sensitive than wall time to a loaded machine
    hits = 0
    for key, q in queries:
        t, c = time.perf_counter(), time.process_time()
        r = manager.retrieve(key, q, (1, 2, 3), 10)
        per_cpu.append((time.process_time() - c) * 1000)
        per.append((time.perf_counter() - t) * 1000)
        hits += bool(r.entries)
    every: list[float] = []
    for _, q in queries:
        t = time.perf_counter()
        manager.retrieve(None, q, (3,), 10)
        every.append((time.perf_counter() - t) * 1000)
    report["per_session"] = summary(per)
    report["per_session"]["with_results"] = hits
    report["per_session_cpu"] = summary(per_cpu)
    report["all_sessions"] = summary(every)
    say(f"per-session retrieve: {report['per_session']}")
    say(f"per-session retrieve, CPU time: {report['per_session_cpu']}")
    say(f"all-session retrieve: {report['all_sessions']}")
    store.close()

    home = Path(tmp) / "home"
    home.mkdir(exist_ok=True)
    env = bench_env(home)
    # the CLI of this checkout, as in-process above (an installed kvcache may be another one)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), env.get("PYTHONPATH", "")) if p)
    key, q = queries[0]
    cli: dict[str, Any] = {}
    for label, cmd in (
        ("per_session", [KVCACHE, "--db", db, "retrieve", key, q, "--json"]),
        ("all_sessions", [KVCACHE, "--db", db, "retrieve", "--all-sessions", q, "--json"]),
    ):
        walls = []
        for _ in range(7):
            t = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True)
            walls.append(time.perf_counter() - t)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode()[-300:]}")
        cli[label] = {
            "median_ms": round(statistics.median(walls) * 1000, 1),
            "min_ms": round(min(walls) * 1000, 1),
        }
        say(f"`kvcache retrieve` ({label}) wall: {cli[label]}")
    report["cli_wall"] = cli
    if args.json:
        print(json.dumps(report, indent=2))
    if args.db is not None or not args.keep:  # the store stays only when it lives in tmp and --keep
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
