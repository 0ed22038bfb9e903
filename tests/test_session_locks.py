"""``kvcache serve``'s session locks: one process (threads) and many hosts (PostgreSQL)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from kvcache_cli.server.sessions import SessionLocks  # noqa: E402
from kvcache_cli.store.backend import open_store  # noqa: E402
from tests.pg import pg_url  # noqa: E402,F401  (fixture)


def test_another_hosts_turn_is_waited_for_only_as_long_as_the_timeout(pg_url: str) -> None:  # noqa: F811
    """Two serve processes on one PostgreSQL store: the second waits for a session the
    first holds at most its lock timeout (then the turn is 503 session_busy), not forever."""
    first_store, second_store = open_store(pg_url), open_store(pg_url)
    try:
        first, second = SessionLocks(first_store, pg_url), SessionLocks(second_store, pg_url)
        release = first.acquire("shared-1", timeout=5)
        assert release is not None
        started = time.monotonic()
        assert second.acquire("shared-1", timeout=0.3) is None
        assert time.monotonic() - started < 3
        assert second.in_progress == 0 and len(second) == 0
        other = second.acquire("shared-2", timeout=0.3)  # another session is free
        assert other is not None
        other()
        release()
        again = second.acquire("shared-1", timeout=5)
        assert again is not None and second.in_progress == 1
        again()
    finally:
        first_store.close()
        second_store.close()


def test_a_stop_waits_until_no_turn_holds_a_session(tmp_path: Path) -> None:
    """``wait_idle``: what a stopping serve waits on before closing the store (a JSON
    turn stores its reply after its answer went out)."""
    store = open_store(str(tmp_path / "kv.db"))
    try:
        locks = SessionLocks(store)
        release = locks.acquire("turn-1", timeout=1)
        assert release is not None
        assert locks.wait_idle(0.05) is False  # still held
        threading.Timer(0.1, release).start()
        started = time.monotonic()
        assert locks.wait_idle(10) is True
        assert time.monotonic() - started < 5 and locks.in_progress == 0 and len(locks) == 0
    finally:
        store.close()
