"""Replay throughput: ``kvcache process`` of the five LoCoMo dev conversations.

Usage: python bench/process_replay.py [--runs R] [--json] [--locomo DIR]

The LoCoMo files (``/work/shared/bench/locomo-dev``) are converted with
``locomo_to_conversations.py`` (one session each; speaker_a -> user, speaker_b ->
assistant). The issue counts 2,760 "turns" (dialog turns = messages); kvcache counts a
turn as a user message and its replies (1,388 here). Both rates are reported.

``kvcache process`` runs with default settings (retrieval triggers, clears, snapshots,
extractive summaries all on) on a fresh store, as a child process (start-up included).
By default it replays new conversations on one worker process per CPU core
(``parallel_replay``); the same replay with ``--jobs 1`` (one process, turn by turn)
is timed too and reported beside it.
Reference, same run: a child Python process replaying the same messages with raw
sqlite3 into a migrated kvcache store, one transaction per kvcache turn (insert the
turn's messages and their FTS rows): the floor of a per-turn transactional replay.
Target: >= 1,000 turns/s (2,760 dialog turns in <= 2.76 s).
"""

# ruff: noqa: E501  (long SQL and report lines)
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KVCACHE, PYTHON, bench_env, create_store, machine, median, run_timed  # noqa: E402
from locomo_to_conversations import convert_file  # noqa: E402

from kvcache_cli.services.parallel_replay import worker_count  # noqa: E402

LOCOMO = Path("/work/shared/bench/locomo-dev")

REFERENCE = r"""
import json, sqlite3, sys
db = sys.argv[1]
conn = sqlite3.connect(db, isolation_level=None)
conn.execute("PRAGMA journal_mode=wal"); conn.execute("PRAGMA synchronous=normal")
mid = 0
for sid, path in enumerate(sys.argv[2:], start=1):
    data = json.load(open(path))
    conn.execute("INSERT INTO sessions (id, key, created_at, last_activity, conversation_count, turn_count, "
                 "cache_size_bytes, capacity_bytes, entry_count, total_clears, metadata) "
                 "VALUES (?, ?, '2024-01-01', '2024-01-01', 0, 0, 0, 0, 0, 0, '{}')", (sid, data["session_id"]))
    msgs = data["messages"]
    starts = [i for i, m in enumerate(msgs) if m["role"] == "user"] + [len(msgs)]
    starts[0] = 0
    for lo, hi in zip(starts, starts[1:]):
        conn.execute("BEGIN IMMEDIATE")
        for i in range(lo, hi):
            mid += 1
            m = msgs[i]
            conn.execute("INSERT INTO messages (id, session_id, message_index, role, name, content, tokens, "
                         "timestamp, importance) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0.5)",
                         (mid, sid, i, m["role"], m.get("name"), m["content"], len(m["content"]) // 4 + 4,
                          m.get("timestamp")))
            conn.execute("INSERT INTO message_fts(rowid, sess, content) VALUES (?, ?, ?)",
                         (mid, f"s{sid}", m["content"]))
        conn.execute("UPDATE sessions SET turn_count = turn_count + 1 WHERE id = ?", (sid,))
        conn.execute("COMMIT")
"""


def measure(runs: int = 3, locomo: Path = LOCOMO, kvcache: str = KVCACHE) -> dict[str, float]:
    """Median seconds and rates of the replay and of the reference (``kvcache``: which install)."""
    sources = sorted(locomo.glob("*.json"))
    if not sources:
        raise SystemExit(f"no LoCoMo files in {locomo}")
    with tempfile.TemporaryDirectory(prefix="kvbench-process-") as tmp:
        folder = Path(tmp)
        env = bench_env(folder / "home")
        files = []
        messages = turns = 0
        for src in sources:
            path, n_messages, n_turns = convert_file(src, folder / "conv")
            files.append(str(path))
            messages += n_messages
            turns += n_turns
        script = folder / "reference.py"
        script.write_text(REFERENCE)
        kv_times: list[float] = []
        one_times: list[float] = []
        ref_times: list[float] = []
        for run in range(runs):
            ref_db = folder / f"ref{run}.db"
            create_store(ref_db, env, kvcache)  # create + migrate
            ref_times.append(run_timed([PYTHON, str(script), str(ref_db), *files], env))
            kv_db = folder / f"kv{run}.db"
            kv_times.append(run_timed([kvcache, "--db", str(kv_db), "-q", "process", *files], env))
            one_db = folder / f"one{run}.db"
            one_times.append(
                run_timed([kvcache, "--db", str(one_db), "-q", "process", "--jobs", "1", *files], env)
            )
    kv = median(kv_times)
    one = median(one_times)
    ref = median(ref_times)
    return {
        "messages": messages,
        "turns": turns,
        "kvcache_seconds": kv,
        "dialog_turns_per_s": messages / kv,
        "kvcache_turns_per_s": turns / kv,
        "jobs1_seconds": one,
        "jobs1_dialog_turns_per_s": messages / one,
        "workers": worker_count(0),
        "reference_seconds": ref,
        "reference_dialog_turns_per_s": messages / ref,
        "ratio_to_reference": ref / kv,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--locomo", type=Path, default=LOCOMO)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.runs, args.locomo)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(machine())
    print(
        f"{result['messages']} dialog turns (messages), {result['turns']} kvcache turns; median of {args.runs}"
    )
    print(
        f"raw sqlite3 per-turn replay  {result['reference_seconds']:6.2f} s "
        f"{result['reference_dialog_turns_per_s']:8.0f} dialog turns/s (reference)"
    )
    print(
        f"kvcache process              {result['kvcache_seconds']:6.2f} s "
        f"{result['dialog_turns_per_s']:8.0f} dialog turns/s, {result['kvcache_turns_per_s']:.0f} kvcache turns/s "
        f"= {result['ratio_to_reference']:.2f}x the reference (target >= 1,000 turns/s)"
    )
    print(
        f"  with --jobs 1 (one process)  {result['jobs1_seconds']:6.2f} s "
        f"{result['jobs1_dialog_turns_per_s']:8.0f} dialog turns/s "
        f"(default: {result['workers']} workers, {result['jobs1_seconds'] / result['kvcache_seconds']:.2f}x faster)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
