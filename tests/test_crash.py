"""Issue 5.2: crash safety and Ctrl-C (real processes killed mid-replay).

A replay killed with SIGKILL at random points leaves a database that passes
``PRAGMA integrity_check`` and holds whole turns only; replaying again ends in exactly
the state of an uninterrupted run. SIGINT stops at a turn boundary with one line on
stderr and exit 130.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import (
    check_turn_boundaries,
    committed_rows,
    integrity,
    invoke,
    logical_state,
    run_kvcache,
    start_kvcache,
    uniform_conversation,
    write_json,
)

#: every case here starts many processes or kills them: seconds each
pytestmark = pytest.mark.slow

KILLS = 8
TURNS = 60


def _stored(db: Path) -> int:
    """Messages committed so far (0 while the store is still being created)."""
    return committed_rows(db, "messages")


def _wait_for_progress(db: Path, proc: subprocess.Popen[str], at_least: int, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while _stored(db) < at_least and time.monotonic() < deadline:
        if proc.poll() is not None:
            return
        time.sleep(0.01)


def test_sigkill_at_random_points_then_replay_equals_uninterrupted(tmp_path: Path) -> None:
    home = tmp_path / "home"
    data = uniform_conversation("crash", TURNS, topic="crash")
    data2 = uniform_conversation("other", TURNS // 2, topic="other", seed=3)
    src = write_json(tmp_path / "crash.json", data, compact=True)
    src2 = write_json(tmp_path / "other.json", data2, compact=True)
    convs = {"crash": data, "other": data2}

    ref = tmp_path / "ref.db"  # the uninterrupted run: in-process (-j 1 forks no workers from pytest)
    done = invoke("-q", "--db", str(ref), "process", "-j", "1", str(src), str(src2), home=home)
    assert done.returncode == 0, done.stderr
    total = len(data["messages"]) + len(data2["messages"])

    rng = random.Random(20240605)
    db = tmp_path / "killed.db"
    killed_at: list[int] = []
    for _ in range(KILLS):
        # -j 1: the turn-by-turn path (new sessions would otherwise be merged whole from workers)
        proc = start_kvcache("-q", "--db", str(db), "process", "-j", "1", str(src), str(src2), home=home)
        # a random point: wait for some progress past what is already stored, then a random delay
        _wait_for_progress(db, proc, min(total - 1, _stored(db) + rng.randint(1, 12)))
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert integrity(db) == "ok"
        check_turn_boundaries(db, convs)
        killed_at.append(_stored(db))
    assert any(0 < n < total for n in killed_at), killed_at  # some kills did land mid-replay

    again = run_kvcache("-q", "--db", str(db), "process", str(src), str(src2), home=home)
    assert again.returncode == 0, again.stderr
    assert integrity(db) == "ok"
    assert logical_state(db) == logical_state(ref)
    print(f"\nSIGKILL x{KILLS}: messages stored at each kill {killed_at} of {total}; final state equal")


def test_sigkill_of_a_parallel_replay_keeps_whole_sessions_and_stops_its_workers(tmp_path: Path) -> None:
    """Workers merge a session at once: a killed run leaves each session whole or absent,
    takes its workers with it, and the next run removes its scratch folder."""
    import psutil

    home = tmp_path / "home"
    data = {f"w{i}": uniform_conversation(f"w{i}", TURNS, topic=f"w{i}", seed=i) for i in range(8)}
    srcs = [str(write_json(tmp_path / f"{key}.json", conv, compact=True)) for key, conv in data.items()]
    ref = tmp_path / "ref.db"
    assert invoke("-q", "--db", str(ref), "process", "-j", "1", *srcs, home=home).returncode == 0
    rng = random.Random(7)
    db = tmp_path / "killed.db"
    sessions_at_kill = []
    for _ in range(3):
        proc = start_kvcache("-q", "--db", str(db), "process", "-j", "2", *srcs, home=home)
        # wait for one or two more merged sessions, then kill soon after
        most = (len(srcs) - 1) * 2 * TURNS
        _wait_for_progress(db, proc, min(most, _stored(db) + 2 * TURNS * rng.randint(1, 2)))
        time.sleep(rng.uniform(0.0, 0.05))
        children = psutil.Process(proc.pid).children()
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive  # the workers died with their parent
        assert integrity(db) == "ok"
        check_turn_boundaries(db, data)
        conn = sqlite3.connect(db)
        try:
            counts = dict(conn.execute("SELECT session_id, count(*) FROM messages GROUP BY 1").fetchall())
        finally:
            conn.close()
        assert all(n == 2 * TURNS for n in counts.values()), counts  # whole sessions only
        sessions_at_kill.append(len(counts))
    assert any(0 < n < len(srcs) for n in sessions_at_kill), sessions_at_kill  # kills landed mid-run
    again = run_kvcache("-q", "--db", str(db), "process", *srcs, home=home)
    assert again.returncode == 0, again.stderr
    assert not list(tmp_path.glob(".kvcache-replay-*"))  # the killed runs' scratch folders
    assert logical_state(db) == logical_state(ref)


def test_ctrl_c_stops_at_a_turn_boundary_with_exit_130(tmp_path: Path) -> None:
    home = tmp_path / "home"
    data = uniform_conversation("intr", TURNS, topic="intr")
    src = write_json(tmp_path / "intr.json", data, compact=True)
    ref = tmp_path / "ref.db"
    assert invoke("-q", "--db", str(ref), "process", "-j", "1", str(src), home=home).returncode == 0

    db = tmp_path / "intr.db"
    proc = start_kvcache("--db", str(db), "process", str(src), home=home)
    _wait_for_progress(db, proc, 20)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "turn boundary" in lines[0], err
    assert "Traceback" not in err
    assert integrity(db) == "ok"
    check_turn_boundaries(db, {"intr": data})

    again = run_kvcache("-q", "--db", str(db), "process", str(src), home=home)
    assert again.returncode == 0, again.stderr
    assert logical_state(db) == logical_state(ref)
