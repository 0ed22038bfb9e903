"""Maintenance at scale: ``kvcache maintain`` and ``kvcache stats`` on a big store.

Usage: python bench/scale_store.py [--messages N] [--sessions S] [--runs R] [--keep DIR] [--json]

The store (built once per run, in a temp folder unless ``--keep``): N messages in S
sessions through ``kvcache import`` (ShareGPT JSONL from ``gen_sharegpt.py``), then per
session 4 snapshots of 20 entries (``max_snapshots`` = 4: 8,000 snapshots for 2,000
sessions), 20 active cache entries, 25 operations (50,000 in all, over the default
``history_limit`` of 10,000), turn counts; half of the sessions idle for two days (so
``maintain`` releases their caches and snapshots), half active now.

``maintain`` is timed on a fresh copy of that store each run (it changes it); ``stats``
(tables) and ``stats --json`` on the store as built. Reference, same run: the bare
Typer app's ``--help`` (``startup.py``'s), i.e. the cost of starting any Typer CLI.
Targets: maintain <= 5 s, stats <= 0.5 s.
"""

# ruff: noqa: E501  (long SQL and report lines)
from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KVCACHE, PYTHON, bench_env, machine, median, run_timed  # noqa: E402
from gen_sharegpt import cached  # noqa: E402
from startup import BARE_APP  # noqa: E402

SNAPSHOTS_PER_SESSION = 4
ENTRIES = 20
OPS_PER_SESSION = 25


def build(folder: Path, messages: int, sessions: int, env: dict[str, str], kvcache: str = KVCACHE) -> Path:
    """A store with the shape described in the module doc; returns its path."""
    db = folder / "scale.db"
    source = cached(messages, sessions)
    run_timed([kvcache, "--db", str(db), "-q", "import", str(source)], env)
    now = datetime.now(UTC).replace(tzinfo=None)
    old = now - timedelta(hours=48)
    conn = sqlite3.connect(str(db), isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    ids = [r[0] for r in conn.execute("SELECT id FROM sessions ORDER BY id")]
    snap_rows = []
    entry_rows = []
    cache_rows = []
    op_rows = []
    snap_id = 0
    for n, sid in enumerate(ids):
        when = old if n % 2 == 0 else now
        conn.execute(
            "UPDATE sessions SET last_activity = ?, entry_count = ?, cache_size_bytes = ?, conversation_count = 2 "
            "WHERE id = ?",
            (str(when), ENTRIES, ENTRIES * 131072 * 50, sid),
        )
        for k in range(SNAPSHOTS_PER_SESSION):
            snap_id += 1
            created = when - timedelta(minutes=10 * (SNAPSHOTS_PER_SESSION - k))
            snap_rows.append(
                (
                    snap_id,
                    sid,
                    4 * (k + 1),
                    "full",
                    "interval",
                    f"{snap_id:064x}",
                    ENTRIES,
                    ENTRIES * 6553600,
                    str(created),
                )
            )
            for e in range(ENTRIES):
                entry_rows.append(
                    (
                        snap_id,
                        f"{snap_id:016x}{e:016x}",
                        f"entry {e} of snapshot {snap_id}",
                        120,
                        0.5,
                        50,
                        6553600,
                        e,
                        e,
                    )
                )
        for e in range(ENTRIES):
            cache_rows.append((sid, f"{sid:016x}{e:016x}", f"cache entry {e}", 120, 0.5, 50, 6553600, e, e))
        for k in range(OPS_PER_SESSION):
            op_rows.append(
                (
                    f"conv-{n + 1}",
                    ("clear", "snapshot", "retrieve")[k % 3],
                    str(when - timedelta(minutes=k)),
                    3,
                    "",
                )
            )
    conn.executemany(
        "INSERT INTO snapshots (id, session_id, turn_index, snapshot_type, reason, state_hash, entry_count, size_bytes, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        snap_rows,
    )
    conn.executemany(
        "INSERT INTO snapshot_entries (snapshot_id, key_hash, key_data, key_type, value_bytes, layer_index, importance, "
        "access_count, tokens, size_bytes, message_index, position) VALUES (?, ?, ?, 'attention_key', ?, 0, ?, 1, ?, ?, ?, ?)",
        entry_rows,
    )
    conn.executemany(
        "INSERT INTO cache_entries (session_id, key_hash, key_data, key_type, value_bytes, layer_index, importance, "
        "access_count, tokens, size_bytes, message_index, position) VALUES (?, ?, ?, 'attention_key', ?, 0, ?, 1, ?, ?, ?, ?)",
        cache_rows,
    )
    conn.executemany(
        "INSERT INTO operations (session_key, operation_type, timestamp, entries_affected, details) VALUES (?, ?, ?, ?, ?)",
        op_rows,
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db


def counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(str(db))
    try:
        return {
            t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
            for t in ("messages", "sessions", "snapshots", "snapshot_entries", "cache_entries", "operations")
        }
    finally:
        conn.close()


def measure(
    messages: int = 1_000_000,
    sessions: int = 2000,
    runs: int = 3,
    keep: Path | None = None,
    kvcache: str = KVCACHE,
) -> dict[str, float]:
    """Median seconds of maintain and stats and of the bare app (``kvcache``: which install)."""
    with tempfile.TemporaryDirectory(prefix="kvbench-scale-") as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        env = bench_env(folder / "home")
        db = folder / "scale.db"
        if not (keep and db.exists()):
            for suffix in ("", "-wal", "-shm"):
                Path(str(db) + suffix).unlink(missing_ok=True)
            build(folder, messages, sessions, env, kvcache)
        shape = counts(db)
        app = folder / "app.py"
        app.write_text(BARE_APP)
        maintain_t: list[float] = []
        stats_t: list[float] = []
        stats_json_t: list[float] = []
        bare_t: list[float] = []
        for run in range(runs):
            copy = folder / f"copy{run}.db"
            shutil.copyfile(db, copy)
            bare_t.append(run_timed([PYTHON, str(app), "--help"], env))
            stats_t.append(run_timed([kvcache, "--db", str(db), "stats"], env))
            stats_json_t.append(run_timed([kvcache, "--db", str(db), "stats", "--json"], env))
            maintain_t.append(run_timed([kvcache, "--db", str(copy), "maintain"], env))
            after = counts(copy)
            for suffix in ("", "-wal", "-shm"):
                Path(str(copy) + suffix).unlink(missing_ok=True)
    bare = median(bare_t)
    result: dict[str, float] = {f"{k}": float(v) for k, v in shape.items()}
    result.update(
        {
            "maintain_seconds": median(maintain_t),
            "stats_seconds": median(stats_t),
            "stats_json_seconds": median(stats_json_t),
            "bare_typer_seconds": bare,
            "maintain_ratio_to_bare": median(maintain_t) / bare,
            "stats_ratio_to_bare": median(stats_t) / bare,
            "after_maintain_snapshots": float(after["snapshots"]),
            "after_maintain_operations": float(after["operations"]),
        }
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="Build (or reuse) the store in this folder.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = measure(args.messages, args.sessions, args.runs, args.keep)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(machine())
    print(
        f"store: {r['messages']:,.0f} messages, {r['sessions']:,.0f} sessions, {r['snapshots']:,.0f} snapshots "
        f"({r['snapshot_entries']:,.0f} entries), {r['operations']:,.0f} operations; median of {args.runs}"
    )
    print(f"bare Typer --help     {r['bare_typer_seconds']:6.2f} s (reference)")
    print(
        f"kvcache maintain      {r['maintain_seconds']:6.2f} s  {r['maintain_ratio_to_bare']:.1f}x  (target <= 5 s)"
    )
    print(
        f"kvcache stats         {r['stats_seconds']:6.2f} s  {r['stats_ratio_to_bare']:.1f}x  (target <= 0.5 s)"
    )
    print(f"kvcache stats --json  {r['stats_json_seconds']:6.2f} s")
    print(
        f"after maintain: {r['after_maintain_snapshots']:,.0f} snapshots, {r['after_maintain_operations']:,.0f} operations"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
