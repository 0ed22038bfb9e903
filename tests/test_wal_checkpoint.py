"""``kvcache serve``'s store: commits never checkpoint the write-ahead log; a thread does."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from kvcache_cli.server.checkpoints import WalCheckpointer
from kvcache_cli.store.backend import open_store
from kvcache_cli.store.connection import Store

ROW = "x" * 2000


def _write(store: Store, n: int) -> None:
    sql = (
        "INSERT INTO operations (session_key, operation_type, timestamp, entries_affected, details) "
        "VALUES (?, ?, ?, ?, ?)"
    )
    for i in range(n):
        params = (f"s{i}", "test", "2026-12-05T00:00:00", 0, ROW)
        store.transaction(partial(store.query, sql, params))


def test_commits_leave_the_log_to_the_checkpointer(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    store = open_store(str(db), autocheckpoint=False)
    try:
        assert store.query("PRAGMA wal_autocheckpoint") == [(100_000,)]  # a backstop only
        before = os.path.getsize(db)
        _write(store, 600)  # about 1,200 pages: past SQLite's own threshold of 1,000
        assert os.path.getsize(str(db) + "-wal") > 1000 * 4096
        assert os.path.getsize(db) == before  # no commit copied the log into the file
        checkpointer = WalCheckpointer(store, interval=0.01)
        log, done = checkpointer.run_once()
        assert log > 1000 and done == log  # all of it at once
        assert os.path.getsize(db) > before + 600 * len(ROW)  # the rows are in the file now
        _write(store, 10)
        checkpointer.last = (0, 0)
        checkpointer.start()
        checkpointer.stop()  # checkpoints once more on its way out
        assert checkpointer.last[0] == checkpointer.last[1] > 0
    finally:
        store.close()


def test_other_openers_keep_automatic_checkpoints(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "kv.db"))
    try:
        assert store.query("PRAGMA wal_autocheckpoint") == [(4000,)]
    finally:
        store.close()


def test_a_failing_checkpoint_is_reported_once(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "kv.db"), autocheckpoint=False)
    said: list[str] = []
    checkpointer = WalCheckpointer(store, on_error=said.append)
    store.close()
    store.db.init(str(tmp_path / "gone" / "kv.db"))  # no longer openable
    assert checkpointer.run_once() == (0, 0) and checkpointer.run_once() == (0, 0)
    assert checkpointer.failures == 2 and len(said) == 1 and "retrying" in said[0]
