"""``process --jobs``: conversations replayed on worker processes and merged.

The contract: the store a parallel replay leaves is the store a sequential replay of
the same files in the same order leaves, row for row and id for id (wall-clock columns
aside), and the output is the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kvcache_cli.config import Config
from kvcache_cli.loaders import load_file
from kvcache_cli.services.manager import KVCacheManager
from kvcache_cli.services.parallel_replay import ParallelReplay, ReplayJob, eligible
from kvcache_cli.store.backend import open_store
from tests.helpers import (
    EXAMPLES,
    cli_env,
    committed_rows,
    conversation,
    invoke,
    kvcache_command,
    recall_conversation,
    run_kvcache,
    strip_wall_clock,
    truncated,
    write_json,
)

WALL = {"last_activity", "created_at", "updated_at", "applied_at", "last_operation", "last_accessed"}


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table in id order, wall-clock columns left out, plus full-text hits."""
    con = sqlite3.connect(path)
    try:
        out: dict[str, list[tuple[Any, ...]]] = {}
        tables = [
            r[0]
            for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'message_fts%' "
                "AND name NOT LIKE 'sqlite_%'"
            )
        ]
        for table in tables:
            wall = WALL | (
                {"timestamp"} if table == "operations" else set()
            )  # wall clock without a file time
            columns = [r[1] for r in con.execute(f"PRAGMA table_info({table})") if r[1] not in wall]
            out[table] = con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY 1").fetchall()
        con.execute("INSERT INTO message_fts(message_fts) VALUES ('integrity-check')")
        for word in ("deadlock", "lisbon", "invoice", "item", "paragraph", "lifetimes"):
            out[f"fts:{word}"] = con.execute(
                "SELECT rowid, sess FROM message_fts WHERE message_fts MATCH ? ORDER BY rowid", (word,)
            ).fetchall()
        return out
    finally:
        con.close()


def inputs(folder: Path) -> list[Path]:
    """Single- and multi-conversation files in every supported form."""
    folder.mkdir(exist_ok=True)
    return [
        EXAMPLES / "support-chat.json",
        write_json(folder / "gen-a.json", recall_conversation("gen-a", 40, "groceries")),
        EXAMPLES / "sharegpt.json",
        EXAMPLES / "openai.jsonl",
        write_json(folder / "gen-b.json", recall_conversation("gen-b", 35, "paint")),
        EXAMPLES / "long-messages.json",
    ]


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return home


def prior_store(tmp_path: Path, name: str) -> Path:
    """A store already holding a session (with snapshots and a clear), so every id the
    merge shifts starts above 1."""
    db = tmp_path / name
    prior = write_json(tmp_path / f"prior-{name}.json", recall_conversation("prior", 34, "camping"))
    rc, _, err = invoke("process", "-j", "1", prior, home=_home(tmp_path), db=db)
    assert rc == 0, err
    return db


@pytest.mark.slow
def test_workers_leave_exactly_the_store_of_a_sequential_replay(tmp_path: Path) -> None:
    files = inputs(tmp_path / "in")
    seq_db, par_db = prior_store(tmp_path, "seq.db"), prior_store(tmp_path, "par.db")
    home = _home(tmp_path)
    rc, seq_out, err = invoke("process", "-j", "1", "--json", "--turns", *files, home=home, db=seq_db)
    assert rc == 0, err
    rc, par_out, err = run_kvcache(
        "-v", "process", "-j", "2", "--json", "--turns", *files, home=home, db=par_db
    )
    assert rc == 0, err
    assert "replaying 3 new conversations on 2 worker processes" in err  # the workers did run
    assert strip_wall_clock(json.loads(par_out)) == strip_wall_clock(json.loads(seq_out))
    seq, par = dump(seq_db), dump(par_db)
    assert seq["sessions"][0][1] == "prior" and len(seq["sessions"]) == 10
    assert len(seq["snapshots"]) > 0 and sum(r[1] for r in seq["statistics"]) > 0
    assert any(row[2] == "snapshot" for row in seq["operations"])  # "Snapshot ID: n" records
    for table in seq:
        assert par[table] == seq[table], table
    assert not list(tmp_path.glob(".kvcache-replay-*"))  # the scratch folder is gone


@pytest.mark.slow
def test_repeated_and_stored_sessions_stay_in_the_parent(tmp_path: Path) -> None:
    """A key named twice (the second file extends the first) and a stored session are
    replayed in the parent, in order; the rest on workers; same store as -j 1."""
    folder = tmp_path / "in"
    files = inputs(folder)
    whole = recall_conversation("twice", 30, "music")
    part = write_json(folder / "twice-1.json", truncated(whole, 31))
    rest = write_json(folder / "twice-2.json", whole)
    more_prior = write_json(folder / "prior-more.json", recall_conversation("prior", 40, "camping"))
    order = [part, *files[:3], more_prior, rest, *files[3:]]
    seq_db, par_db = prior_store(tmp_path, "seq.db"), prior_store(tmp_path, "par.db")
    home = _home(tmp_path)
    rc, seq_out, err = invoke("process", "-j", "1", "--json", *order, home=home, db=seq_db)
    assert rc == 0, err
    rc, par_out, err = run_kvcache("-v", "process", "-j", "2", "--json", *order, home=home, db=par_db)
    assert rc == 0, err
    assert "replaying 3 new conversations on 2 worker processes" in err
    assert strip_wall_clock(json.loads(par_out)) == strip_wall_clock(json.loads(seq_out))
    assert dump(par_db) == dump(seq_db)


def test_a_failed_worker_merges_nothing_and_the_caller_replays_it(tmp_path: Path) -> None:
    """A worker's replay that raises (here a kv entry the loader would have refused)
    writes nothing; ``result`` returns None and the caller's own replay then stores
    the turns before the bad one and raises the error a sequential run raises."""
    from kvcache_cli.errors import BadInputError
    from kvcache_cli.loaders import Conversation

    good = load_file(write_json(tmp_path / "good.json", recall_conversation("good", 20, "cake")), "auto")[0]
    bad = load_file(write_json(tmp_path / "bad.json", recall_conversation("bad", 20, "tea")), "auto")[0]
    bad = Conversation(
        bad.session_key, bad.messages, [{"message_index": 21, "text": "x", "layer_index": "7x"}]
    )
    store = open_store(tmp_path / "kv.db")
    try:
        with ParallelReplay(store, Config(), [ReplayJob(bad, "bad"), ReplayJob(good, "good")], 2) as runner:
            assert runner.result(0) is None
            assert store.query("SELECT count(*) FROM sessions")[0][0] == 0
            assert runner.result(1) is not None
        with pytest.raises(BadInputError, match=r"kv_entries\[0\]: invalid literal for int"):
            KVCacheManager(store, Config()).process_conversation(bad, "bad")
        rows = store.query(
            "SELECT s.key, count(*) FROM messages JOIN sessions s ON s.id = session_id GROUP BY 1"
        )
        assert sorted(rows) == [("bad", 21), ("good", 41)]  # the turns before message 21
    finally:
        store.close()


def test_a_session_stored_meanwhile_is_not_merged(tmp_path: Path) -> None:
    """Another writer stores a job's session while the workers run: the merge writes
    nothing of it (the caller replays it itself), and the other jobs merge."""
    db = tmp_path / "kv.db"
    home = _home(tmp_path)
    a = write_json(tmp_path / "a.json", recall_conversation("a", 20, "tea"))
    b = write_json(tmp_path / "b.json", recall_conversation("b", 20, "cake"))
    other = write_json(tmp_path / "other.json", conversation(3, session_id="a"))
    store = open_store(db)
    try:
        jobs = [ReplayJob(load_file(p, "auto")[0], key) for p, key in ((a, "a"), (b, "b"))]
        assert eligible(store, None, jobs) == [True, True]
        with ParallelReplay(store, Config(), jobs, 2) as runner:
            rc, _, err = run_kvcache("process", "-j", "1", other, home=home, db=db)
            assert rc == 0, err
            assert runner.result(0) is None
            merged = runner.result(1)
        assert merged is not None and merged.session_id == "b" and merged.messages_added == 41
        rows = store.query(
            "SELECT s.key, count(*) FROM messages JOIN sessions s ON s.id = session_id GROUP BY 1"
        )
        assert sorted(rows) == [("a", 7), ("b", 41)]  # "a" is the other writer's 7 messages
    finally:
        store.close()


def test_which_conversations_go_to_workers(tmp_path: Path) -> None:
    from kvcache_cli.services.parallel_replay import MIN_WORKER_MESSAGES

    def conv(key: str, turns: int, **extra: Any) -> Any:
        data = conversation(turns, session_id=key) | extra
        return load_file(write_json(tmp_path / f"{key}.json", data), "auto")[0]

    store = open_store(tmp_path / "kv.db")
    try:
        a, b, c = conv("a", 20), conv("b", 20), conv("c", 20)
        KVCacheManager(store, Config()).process_conversation(c, "c")  # stored already
        short = conv("s", (MIN_WORKER_MESSAGES - 2) // 2)  # one message short, with the system one
        empty = conv("e", 0, messages=[])
        assert len(a.messages) >= MIN_WORKER_MESSAGES > len(short.messages)
        jobs = [ReplayJob(a, "a"), ReplayJob(b, "b"), ReplayJob(a, "a"), ReplayJob(c, "c")]
        jobs += [ReplayJob(short, "s"), ReplayJob(empty, "e")]
        # "a" named twice, "c" stored, "s" and "e" too short to be worth a worker
        assert eligible(store, None, jobs) == [False, True, False, False, False, False]
        assert eligible(store, object(), jobs) == [False] * 6  # an LLM server: the parent replays
        huge = conv("h", 20)
        huge.messages[3].content = "x" * 200_001
        assert eligible(store, None, [ReplayJob(huge, "h")]) == [False]  # too big for the index
    finally:
        store.close()
    memory = open_store(":memory:")
    try:
        assert eligible(memory, None, [ReplayJob(a, "a")]) == [False]
    finally:
        memory.close()


@pytest.mark.slow
def test_errors_are_reported_in_file_order_and_short_or_empty_ones_stay_in_the_parent(
    tmp_path: Path,
) -> None:
    """Files are read ahead for the workers; their errors still come in file order, and
    an empty conversation (which stores no session) is the parent's, as with -j 1."""
    folder = tmp_path / "in"
    files = inputs(folder)
    stored = write_json(folder / "x.json", conversation(3, session_id="x"))
    changed = conversation(3, session_id="x")
    changed["messages"][1]["content"] = "something else"
    order = [
        stored,
        files[1],
        write_json(folder / "x-changed.json", changed),
        files[0],
        folder / "missing.json",
        write_json(folder / "empty.json", {"session_id": "nothing", "messages": []}),
        files[4],
    ]
    (folder / "broken.json").write_text("{not json")
    order.insert(3, folder / "broken.json")
    runs = {}
    for jobs in ("1", "2"):
        db = tmp_path / f"j{jobs}.db"
        rc, out, err = run_kvcache("-v", "process", "-j", jobs, "--json", *order, home=_home(tmp_path), db=db)
        errors = [line for line in err.splitlines() if line.startswith("kvcache: error:")]
        runs[jobs] = (rc, strip_wall_clock(json.loads(out)), errors, dump(db))
    assert runs["2"] == runs["1"]
    rc, out, errors, _ = runs["2"]
    assert rc == 2 and len(errors) == 3
    assert "x-changed.json" in errors[0] and "broken.json" in errors[1] and "missing.json" in errors[2]
    assert len(out["failed"]) == len(errors)
    for failure, line in zip(out["failed"], errors, strict=True):  # objects, in stderr's order
        assert line.startswith(f"kvcache: error: {failure['file']}") and failure["message"] in line


@pytest.mark.slow
def test_ctrl_c_keeps_whole_sessions_and_a_rerun_finishes(tmp_path: Path) -> None:
    """SIGINT during a parallel replay: exit 130, no scratch files, every stored session
    complete (merged sessions are all-or-nothing); the same command then finishes."""
    folder = tmp_path / "in"
    folder.mkdir()
    files = [
        write_json(folder / f"c{i}.json", recall_conversation(f"c{i}", 150, f"topic{i}")) for i in range(12)
    ]
    db = tmp_path / "kv.db"
    home = _home(tmp_path)
    command = [*kvcache_command(), "--db", str(db), "-q", "process", "-j", "2", *map(str, files)]
    # its own process group: whatever happens, the finally kills the run and its workers
    proc = subprocess.Popen(
        command,
        env=cli_env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not committed_rows(db, "sessions"):
            time.sleep(0.005)  # until the first merge
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not list(tmp_path.glob(".kvcache-replay-*"))
    con = sqlite3.connect(db)
    try:
        counts = con.execute("SELECT session_id, count(*) FROM messages GROUP BY 1").fetchall()
        con.execute("INSERT INTO message_fts(message_fts) VALUES ('integrity-check')")
    finally:
        con.close()
    assert all(n == 301 for _, n in counts) and 0 < len(counts) < 12
    rc, _, err = run_kvcache("process", *files, home=home, db=db)
    assert rc == 0, err
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT count(*), count(DISTINCT session_id) FROM messages").fetchone() == (
            3612,
            12,
        )
    finally:
        con.close()


def test_stale_scratch_folders_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    import fcntl

    from kvcache_cli.services.parallel_replay import _STAGING_PREFIX, SCRATCH_PREFIX, remove_stale_scratch

    store = open_store(tmp_path / "kv.db")
    try:
        folders = {
            "dead": tmp_path / f"{SCRATCH_PREFIX}dead",  # its run was killed: nobody holds the lock
            "live": tmp_path / f"{SCRATCH_PREFIX}live",  # a run in progress holds it
            "new": tmp_path / f"{_STAGING_PREFIX}new",  # a run setting up, right now
            "old": tmp_path / f"{_STAGING_PREFIX}old",  # a run killed while setting up
        }
        for folder in folders.values():
            folder.mkdir()
            (folder / "lock").touch()
            (folder / "0.db").write_bytes(b"scratch")
        held = os.open(folders["live"] / "lock", os.O_RDWR)
        fcntl.flock(held, fcntl.LOCK_EX)
        os.utime(folders["old"], (time.time() - 3600, time.time() - 3600))
        try:
            assert remove_stale_scratch(store) == 2
        finally:
            os.close(held)
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
            f"{SCRATCH_PREFIX}live",
            f"{_STAGING_PREFIX}new",
        ]
    finally:
        store.close()


def test_a_dead_worker_leaves_its_jobs_to_the_caller(tmp_path: Path) -> None:
    """A worker killed (the OOM killer, say): nothing of its jobs is merged, ``result``
    returns None so the caller replays them itself, and one notice says why."""
    import psutil

    convs = [
        load_file(write_json(tmp_path / f"{k}.json", conversation(200, session_id=k)), "auto")[0]
        for k in "ab"
    ]
    store = open_store(tmp_path / "kv.db")
    try:
        with ParallelReplay(store, Config(), [ReplayJob(c, c.session_key or "") for c in convs], 2) as runner:
            for worker in psutil.Process().children():
                worker.kill()
            assert runner.result(0) is None and runner.result(1) is None
            assert len(runner.notices) == 1 and "worker process died" in runner.notices[0]
        assert store.query("SELECT count(*) FROM sessions")[0][0] == 0
        assert not list(tmp_path.glob(".kvcache-*"))
    finally:
        store.close()


@pytest.mark.slow
def test_files_are_read_ahead_in_batches_and_each_batch_merges_exactly(tmp_path: Path) -> None:
    """With a tiny read-ahead budget every file is its own batch (so a parallel replay
    never holds more than about ``READ_AHEAD_BYTES`` of input): two JSON Lines files of
    two conversations each give two worker batches and the store of ``--jobs 1``."""
    import sys

    from kvcache_cli.services.parallel_replay import read_ahead

    assert list(read_ahead([3, 1, 1, 5, 2], lambda n: n, 4)) == [[3, 1], [1, 5], [2]]
    assert list(read_ahead([3, 1], lambda n: n, 0)) == [[3], [1]]
    folder = tmp_path / "in"
    folder.mkdir()
    files = []
    for name in ("one", "two"):
        lines = [json.dumps(recall_conversation(f"{name}-{i}", 25, name)) for i in range(2)]
        files.append(folder / f"{name}.jsonl")
        files[-1].write_text("\n".join(lines) + "\n")
    home = _home(tmp_path)
    rc, seq_out, err = invoke("process", "-j", "1", "--json", *files, home=home, db=tmp_path / "seq.db")
    assert rc == 0, err
    script = (
        "import sys; import kvcache_cli.services.parallel_replay as p; p.READ_AHEAD_BYTES = 1; "
        "from kvcache_cli.cli.app import main; sys.argv[0] = 'kvcache'; main()"
    )
    command = [sys.executable, "-c", script, "--db", str(tmp_path / "par.db"), "-v", "process", "-j", "2"]
    proc = subprocess.run(
        [*command, "--json", *map(str, files)], env=cli_env(home), capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("replaying 2 new conversations on 2 worker processes") == 2
    assert strip_wall_clock(json.loads(proc.stdout)) == strip_wall_clock(json.loads(seq_out))
    assert dump(tmp_path / "par.db") == dump(tmp_path / "seq.db")


def test_ctrl_c_inside_a_merge_rolls_it_back_and_exits_130(tmp_path: Path) -> None:
    """SIGINT right after a merge's BEGIN (before peewee records the transaction): the
    merge is rolled back, the scratch store detached, and the run ends as any Ctrl-C."""
    import sys

    files = [
        write_json(tmp_path / f"m{i}.json", recall_conversation(f"m{i}", 25, f"topic{i}")) for i in range(3)
    ]
    script = """
import os, signal, sys, traceback
import peewee
push = peewee.Database.push_transaction
armed = [True]
def interrupted_push(self, transaction):
    if armed[0] and any(f.name == "merge_session" for f in traceback.extract_stack()):
        armed[0] = False
        os.kill(os.getpid(), signal.SIGINT)  # lands between BEGIN and the bookkeeping
    return push(self, transaction)
peewee.Database.push_transaction = interrupted_push
from kvcache_cli.cli.app import main
sys.argv[0] = "kvcache"
main()
"""
    db = tmp_path / "kv.db"
    command = [
        sys.executable,
        "-c",
        script,
        "--db",
        str(db),
        "process",
        "-j",
        "2",
        "--json",
        *map(str, files),
    ]
    proc = subprocess.run(command, env=cli_env(_home(tmp_path)), capture_output=True, text=True, check=False)
    assert proc.returncode == 130, proc.stderr
    assert json.loads(proc.stdout) == {"sessions": [], "failed": []}
    assert proc.stderr.strip().endswith("stopped cleanly at a turn boundary (replay again to finish)")
    assert "Traceback" not in proc.stderr and "locked" not in proc.stderr
    assert committed_rows(db, "sessions") == 0 and committed_rows(db, "messages") == 0
    assert not list(tmp_path.glob(".kvcache-*"))


def test_a_worker_store_keeps_no_full_text_index_and_refuses_to_search_it(tmp_path: Path) -> None:
    """Workers skip the full-text index (the merge builds it in the real store); a
    search that would need it fails, so that worker's conversation goes to the parent."""
    from kvcache_cli.errors import StoreError

    conv = load_file(write_json(tmp_path / "s.json", recall_conversation("s", 20, "tea")), "auto")[0]
    store = open_store(tmp_path / "scratch.db")
    try:
        manager = KVCacheManager(store, Config())
        manager.index_history = False
        result = manager.process_conversation(conv, "s")  # tier 3 from the in-memory index
        assert sum(t.retrieved for t in result.turns) > 0
        assert store.query("SELECT count(*) FROM message_fts_docsize")[0][0] == 0
        with pytest.raises(StoreError, match="no full-text index"):
            manager.retrieve("s", "grocery list")
    finally:
        store.close()
