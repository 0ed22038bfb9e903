"""Issue 5.3: overlapping maintenance, active sessions kept, ``--dry-run`` changes nothing.

Real ``kvcache maintain`` processes on a real store: the maintenance lock lets one run
prune at a time (the other reports and exits 0), an active session keeps its
messages and summary, and a dry run leaves the database file identical byte for byte.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest

from tests.helpers import connect, integrity, invoke, start_kvcache, uniform_conversation, write_json

CONFIG = """
[cache.snapshot]
max_snapshots = 1

[maintenance]
history_limit = 20
"""


def _checkpoint(db: Path) -> None:
    conn = sqlite3.connect(str(db))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _digest(db: Path) -> dict[str, str]:
    """Hash of every file of the store (database, WAL, shared memory, lock files)."""
    out = {}
    for path in sorted(db.parent.iterdir()):
        if path.name.startswith(db.name):
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a store with an idle session ``old`` and active ``live`` and ``busy``
    (with summaries), made once per module: each test gets a copy (``store``)."""
    base = tmp_path_factory.mktemp("processed")
    folder = base / "store"
    folder.mkdir()
    db = folder / "kv.db"
    files = [
        write_json(base / f"{key}.json", uniform_conversation(key, 20, topic=key, seed=i), compact=True)
        for i, key in enumerate(("old", "live", "busy"))
    ]
    done = invoke("-q", "--db", str(db), "process", *map(str, files), home=base / "home")
    assert done.returncode == 0, done.stderr
    conn = connect(db)
    with conn:
        conn.execute("UPDATE sessions SET last_activity = datetime('now', '-48 hours') WHERE key = 'old'")
    conn.close()
    _checkpoint(db)
    return folder


@pytest.fixture()
def store(processed: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the ``processed`` store (files and modes as the store made them), its
    kvcache home and config."""
    folder = tmp_path / "store"
    shutil.copytree(processed, folder)
    config = tmp_path / "kvcache.toml"
    config.write_text(CONFIG)
    return tmp_path / "home", folder / "kv.db", config


def _history(db: Path) -> dict[str, object]:
    conn = connect(db)
    try:
        return {
            "messages": conn.execute(
                "SELECT s.key, count(*), sum(length(m.content)) FROM messages m JOIN sessions s ON s.id = m.session_id "  # noqa: E501
                "GROUP BY s.key ORDER BY s.key"
            ).fetchall(),
            "summaries": conn.execute(
                "SELECT s.key, u.text FROM summaries u JOIN sessions s ON s.id = u.session_id ORDER BY s.key"
            ).fetchall(),
        }
    finally:
        conn.close()


def _count(db: Path, sql: str, *args: object) -> int:
    conn = connect(db)
    try:
        return int(conn.execute(sql, args).fetchone()[0])
    finally:
        conn.close()


def test_dry_run_changes_nothing_byte_for_byte(store: tuple[Path, Path, Path]) -> None:
    home, db, config = store
    before = _digest(db)
    result = invoke("--db", str(db), "--config", str(config), "maintain", "--dry-run", "--json", home=home)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    assert report["cleaned_sessions"] == ["old"]
    assert report["snapshots_pruned"] > 0 and report["operations_trimmed"] > 0
    after = _digest(db)
    lock = f"{db.name}.maintain.lock"
    assert {k: v for k, v in after.items() if k != lock} == before
    assert after.get(lock, hashlib.sha256(b"").hexdigest()) == hashlib.sha256(b"").hexdigest()


def test_maintain_keeps_messages_and_summaries(store: tuple[Path, Path, Path]) -> None:
    home, db, config = store
    history = _history(db)
    live_cache = _count(
        db, "SELECT count(*) FROM cache_entries c JOIN sessions s ON s.id = c.session_id WHERE s.key = 'live'"
    )
    assert live_cache > 0 and len(history["summaries"]) == 3  # type: ignore[arg-type]
    result = invoke("--db", str(db), "--config", str(config), "maintain", "--json", home=home)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cleaned_sessions"] == ["old"]
    assert _history(db) == history  # no message or summary of any session is deleted
    for key in ("live", "busy"):  # active sessions keep their cache and their newest snapshot
        assert _count(db, "SELECT entry_count FROM sessions WHERE key = ?", key) > 0
        assert (
            _count(
                db,
                "SELECT count(*) FROM snapshots p JOIN sessions s ON s.id = p.session_id WHERE s.key = ?",
                key,
            )
            == 1
        )
    assert (
        _count(
            db,
            "SELECT count(*) FROM cache_entries c JOIN sessions s ON s.id = c.session_id WHERE s.key = 'live'",  # noqa: E501
        )
        == live_cache
    )
    assert (
        _count(
            db,
            "SELECT count(*) FROM cache_entries c JOIN sessions s ON s.id = c.session_id WHERE s.key = 'old'",
        )
        == 0
    )
    assert _count(db, "SELECT count(*) FROM operations") <= 20
    retrieved = invoke(
        "--db", str(db), "retrieve", "old", "old size 5 important", "--tiers", "3", "--json", home=home
    )
    assert retrieved.returncode == 0 and json.loads(retrieved.stdout)["results"], retrieved.stderr
    assert integrity(db) == "ok"


def test_maintain_while_another_holds_the_lock_reports_and_exits_0(store: tuple[Path, Path, Path]) -> None:
    home, db, config = store
    lock = Path(f"{db}.maintain.lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = _digest(db)
        result = invoke("--db", str(db), "--config", str(config), "maintain", "--json", home=home)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["skipped"] is True
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "another kvcache maintain" in lines[0]
        assert _digest(db) == before
    finally:
        os.close(fd)


def test_two_maintains_started_together_never_both_prune(store: tuple[Path, Path, Path]) -> None:
    home, db, config = store
    expected = json.loads(
        invoke("--db", str(db), "--config", str(config), "maintain", "--dry-run", "--json", home=home).stdout
    )
    procs = [
        start_kvcache("--db", str(db), "--config", str(config), "maintain", "--json", home=home)
        for _ in range(2)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    ran = [r for r in reports if not r.get("skipped")]
    pruned = [set(r["pruned_snapshot_ids"]) for r in ran]
    cleaned = [set(r["cleaned_sessions"]) for r in ran]
    if len(ran) == 2:  # the second started after the first had finished: it found nothing left
        assert not (pruned[0] & pruned[1]) and not (cleaned[0] & cleaned[1])
    assert set().union(*pruned) == set(expected["pruned_snapshot_ids"])
    assert set().union(*cleaned) == set(expected["cleaned_sessions"])
    assert integrity(db) == "ok"


def test_store_files_are_owner_only(store: tuple[Path, Path, Path]) -> None:
    home, db, config = store
    assert invoke("--db", str(db), "--config", str(config), "maintain", home=home).returncode == 0
    proc = start_kvcache("--db", str(db), "stats", "--json", home=home)
    proc.communicate(timeout=60)
    for path in db.parent.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, (path.name, oct(mode))


def test_cron_output_dry_run_lists_run_sums_up_then_silent(store: tuple[Path, Path, Path]) -> None:
    home, db, config = store
    base = ("--db", str(db), "--config", str(config), "maintain")
    dry = invoke(*base, "--dry-run", home=home)
    assert dry.returncode == 0, dry.stderr
    assert "would release idle session old" in dry.stdout
    assert "would prune snapshots" in dry.stdout
    real = invoke(*base, home=home)
    assert real.returncode == 0, real.stderr
    assert real.stdout.splitlines() == [
        line for line in real.stdout.splitlines() if line.startswith("released 1 idle session, pruned ")
    ]
    assert len(real.stdout.splitlines()) == 1
    again = invoke(*base, home=home)
    assert again.returncode == 0 and again.stdout == "" and again.stderr == ""


def test_released_sessions_leave_the_active_count(store: tuple[Path, Path, Path]) -> None:
    home, db, config = store
    base = ("--db", str(db), "--config", str(config))
    before = json.loads(invoke(*base, "stats", "--json", home=home).stdout)
    assert before["active_sessions"] == before["session_count"] == 3
    assert invoke(*base, "maintain", home=home).returncode == 0
    after = json.loads(invoke(*base, "stats", "--json", home=home).stdout)
    assert after["session_count"] == 3 and after["active_sessions"] == 2  # "old" was released


def test_snapshot_ids_are_never_reused_after_deletion(store: tuple[Path, Path, Path]) -> None:
    """Released (deleted) snapshots leave their ids behind: a new one gets a fresh id."""
    home, db, config = store
    base = ("--db", str(db), "--config", str(config))
    listed = json.loads(invoke(*base, "snapshot", "--list", "--json", home=home).stdout)["snapshots"]
    highest = max(s["id"] for s in listed)
    # release everything, including the newest snapshots
    assert invoke(*base, "maintain", "--inactive-hours", "0", home=home).returncode == 0
    assert json.loads(invoke(*base, "snapshot", "--list", "--json", home=home).stdout)["snapshots"] == []
    made = json.loads(invoke(*base, "snapshot", "live", "--json", home=home).stdout)
    assert made["id"] > highest
