"""``kvcache serve``'s session locks: one process (threads) and many hosts (PostgreSQL)."""

from __future__ import annotations

import time

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
