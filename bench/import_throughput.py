"""Import throughput: ``kvcache import`` of a ShareGPT JSONL file vs raw sqlite3 inserts.

Usage: python bench/import_throughput.py [--messages N] [--conversations C] [--runs R] [--json]

Reference (same run, same file, same schema): a child Python process that reads the
file line by line with ``json.loads``, inserts every message into a freshly migrated
kvcache store with ``sqlite3`` ``executemany`` in one transaction, then rebuilds the
FTS5 index (``INSERT INTO message_fts(message_fts) VALUES('rebuild')``). Both run as
child processes (start-up included), interleaved, ``R`` times; medians reported, and
kvcache's messages/s as a ratio of the reference's. Target: >= 25,000 messages/s for
1,000,000 messages (the reference reaches about 64,000/s on the target machine).
"""

# ruff: noqa: E501  (long SQL and report lines)
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KVCACHE, PYTHON, bench_env, create_store, machine, median, run_rusage  # noqa: E402
from gen_sharegpt import cached  # noqa: E402

REFERENCE = r"""
import json, sqlite3, sys
db, src = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(db, isolation_level=None)
conn.execute("PRAGMA journal_mode=wal"); conn.execute("PRAGMA synchronous=normal")
conn.execute("BEGIN IMMEDIATE")
sid = 0
mid = 0
rows = []
with open(src, "rb") as handle:
    for line in handle:
        item = json.loads(line)
        sid += 1
        conn.execute(
            "INSERT INTO sessions (id, key, created_at, last_activity, conversation_count, turn_count, "
            "cache_size_bytes, capacity_bytes, entry_count, total_clears, metadata) "
            "VALUES (?, ?, '2024-01-01', '2024-01-01', 0, 0, 0, 0, 0, 0, '{}')", (sid, item["id"]))
        for i, turn in enumerate(item["conversations"]):
            mid += 1
            text = turn["value"]
            rows.append((mid, sid, i, "user" if turn["from"] == "human" else "assistant", text,
                         (len(text) + 3) // 4 + 4))
        if len(rows) >= 50000:
            conn.executemany("INSERT INTO messages (id, session_id, message_index, role, content, tokens, "
                             "importance) VALUES (?, ?, ?, ?, ?, ?, 0.5)", rows)
            rows = []
conn.executemany("INSERT INTO messages (id, session_id, message_index, role, content, tokens, importance) "
                 "VALUES (?, ?, ?, ?, ?, ?, 0.5)", rows)
conn.execute("INSERT INTO message_fts(message_fts) VALUES('rebuild')")
conn.execute("COMMIT")
"""


def count_rows(db: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(str(db))
    try:
        return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


def measure(
    messages: int = 1_000_000, conversations: int = 2000, runs: int = 3, kvcache: str = KVCACHE
) -> dict[str, float]:
    """Median seconds, messages/s, peak RSS of kvcache import and of the reference
    (``kvcache``: which install)."""
    source = cached(messages, conversations)
    ref_times: list[float] = []
    kv_times: list[float] = []
    kv_rss: list[int] = []
    with tempfile.TemporaryDirectory(prefix="kvbench-import-") as tmp:
        folder = Path(tmp)
        env = bench_env(folder / "home")
        script = folder / "reference.py"
        script.write_text(REFERENCE)
        for run in range(runs):
            ref_db = folder / f"ref{run}.db"
            create_store(ref_db, env, kvcache)  # create + migrate
            seconds, _ = run_rusage([PYTHON, str(script), str(ref_db), str(source)], env)
            ref_times.append(seconds)
            if count_rows(ref_db) != messages:
                raise RuntimeError("reference stored the wrong number of messages")
            ref_db.unlink()
            kv_db = folder / f"kv{run}.db"
            seconds, rss = run_rusage([kvcache, "--db", str(kv_db), "-q", "import", str(source)], env)
            kv_times.append(seconds)
            kv_rss.append(rss)
            if count_rows(kv_db) != messages:
                raise RuntimeError("kvcache import stored the wrong number of messages")
            for suffix in ("", "-wal", "-shm"):
                Path(str(kv_db) + suffix).unlink(missing_ok=True)
            Path(str(ref_db) + "-wal").unlink(missing_ok=True)
            Path(str(ref_db) + "-shm").unlink(missing_ok=True)
    ref = median(ref_times)
    kv = median(kv_times)
    return {
        "messages": messages,
        "reference_seconds": ref,
        "reference_per_s": messages / ref,
        "kvcache_seconds": kv,
        "kvcache_per_s": messages / kv,
        "ratio_to_reference": ref / kv,
        "kvcache_peak_rss_mb": median([r / 2**20 for r in kv_rss]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.messages, args.conversations, args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(machine())
    print(f"{args.messages:,} messages, {args.conversations:,} conversations, median of {args.runs}")
    print(
        f"raw sqlite3 + rebuild   {result['reference_seconds']:7.2f} s  {result['reference_per_s']:9,.0f} msg/s (reference)"
    )
    print(
        f"kvcache import          {result['kvcache_seconds']:7.2f} s  {result['kvcache_per_s']:9,.0f} msg/s "
        f"= {result['ratio_to_reference']:.2f}x the reference (target >= 25,000 msg/s; "
        f"peak RSS {result['kvcache_peak_rss_mb']:.0f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
