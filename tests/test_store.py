"""The store: file creation and safety, URLs, migrations, transactions.

The backend-neutral cases run on SQLite and PostgreSQL (``store_url``; the
PostgreSQL variant needs ``KVCACHE_TEST_PG_URL``); file modes, WAL and the
non-SQLite-file guard are SQLite-only.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kvcache_cli.errors import BadInputError, StoreError
from kvcache_cli.store import models as m
from kvcache_cli.store.backend import open_store, parse_location, redact_url
from kvcache_cli.store.migrations import LATEST_VERSION, utcnow
from tests.pg import is_pg, store_url  # noqa: F401  (fixture)

TABLES = {
    "sessions",
    "messages",
    "cache_entries",
    "snapshots",
    "snapshot_entries",
    "summaries",
    "embeddings",
    "engagement",
    "operations",
    "statistics",
    "turn_log",
    "schema_migrations",
}


def test_new_store_is_private_and_migrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the default location is created (private); an explicit path's folder must exist (issue 17.8)
    monkeypatch.setenv("KVCACHE_HOME", str(tmp_path / "sub"))
    path = tmp_path / "sub" / "kvcache.db"
    store = open_store(None)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        names = {r[0] for r in store.db.execute_sql("SELECT name FROM sqlite_master WHERE type='table'")}
        assert TABLES <= names
        versions = [
            r.version for r in store.bind(m.SchemaMigration.select().order_by(m.SchemaMigration.version))
        ]
        assert versions == list(range(1, LATEST_VERSION + 1))
        assert store.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        store.close()
    again = open_store(path)  # reopening applies nothing twice
    try:
        assert store.bind(m.SchemaMigration.select()).count() == LATEST_VERSION
        assert store.bind(m.Statistics.select()).count() == 1
    finally:
        again.close()


def test_new_store_is_migrated_once_on_each_backend(store_url: str) -> None:  # noqa: F811
    store = open_store(store_url)
    try:
        assert store.backend == ("postgresql" if is_pg(store_url) else "sqlite")
        assert TABLES <= set(store.db.get_tables())
        versions = [
            r.version for r in store.bind(m.SchemaMigration.select().order_by(m.SchemaMigration.version))
        ]
        assert versions == list(range(1, LATEST_VERSION + 1))
    finally:
        store.close()
    again = open_store(store_url)  # reopening applies nothing twice
    try:
        assert store.bind(m.SchemaMigration.select()).count() == LATEST_VERSION
        assert store.bind(m.Statistics.select()).count() == 1
        assert "***" in again.location.display or not is_pg(store_url)
    finally:
        again.close()


def test_existing_non_sqlite_file_is_never_touched(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"my precious notes\n")
    with pytest.raises(StoreError, match="not a SQLite database"):
        open_store(path)
    assert path.read_bytes() == b"my precious notes\n"
    with pytest.raises(BadInputError, match="is a directory"):
        open_store(tmp_path)


def test_locations() -> None:
    assert parse_location("sqlite:////abs/x.db").target == "/abs/x.db"
    assert parse_location("sqlite:///rel.db").target == "rel.db"
    assert parse_location("/tmp/a.db").backend == "sqlite"
    assert parse_location("postgresql://u:pw@h/db").backend == "postgresql"
    with pytest.raises(BadInputError):
        parse_location("sqlite://x.db")  # would silently be in memory
    with pytest.raises(BadInputError, match="unsupported scheme"):
        parse_location("mysql://h/db")
    assert "pw" not in redact_url("postgresql://u:pw@h:5432/db")
    assert "***" in parse_location("postgresql://u:pw@h/db").display


def test_transaction_rolls_back_on_error(store_url: str) -> None:  # noqa: F811
    store = open_store(store_url)
    try:

        def work() -> None:
            store.bind(m.Session.insert(key="s", created_at=utcnow(), last_activity=utcnow())).execute()
            raise ValueError("boom")

        with pytest.raises(ValueError):
            store.transaction(work)
        assert store.bind(m.Session.select()).count() == 0
        assert (
            store.transaction(
                lambda: (
                    store.bind(
                        m.Session.insert(key="t", created_at=utcnow(), last_activity=utcnow())
                    ).execute()
                    and store.bind(m.Session.select()).get()
                )
            ).key
            == "t"
        )
        assert store.bind(m.Session.select()).count() == 1
    finally:
        store.close()


def test_close_rolls_back_a_transaction_a_ctrl_c_tore(store_url: str) -> None:  # noqa: F811
    """A Ctrl-C between peewee's BEGIN and the ``with`` block taking over leaves the
    transaction open with no block to end it: closing rolls it back instead of failing
    with "Attempting to close database while transaction is open"."""
    store = open_store(store_url)
    torn = store.db.atomic()
    torn.__enter__()  # entered, never exited: what the interrupt leaves behind
    store.bind(m.Session.insert(key="torn", created_at=utcnow(), last_activity=utcnow())).execute()
    store.close()
    again = open_store(store_url)
    try:
        assert again.bind(m.Session.select()).count() == 0  # nothing of it was committed
    finally:
        again.close()


def test_exclusive_lock_is_exclusive(store_url: str) -> None:  # noqa: F811
    from kvcache_cli.errors import LockBusyError

    store = open_store(store_url)
    other = open_store(store_url)  # another process or host on the same store
    try:
        with store.exclusive("maintain"):
            with pytest.raises(LockBusyError):
                with other.exclusive("maintain"):
                    pass
            with other.exclusive("snapshot"):  # another name is another lock
                pass
        with other.exclusive("maintain"):
            with pytest.raises(LockBusyError):
                with store.exclusive("maintain"):
                    pass
        with store.exclusive("maintain"):
            pass
    finally:
        other.close()
        store.close()


def test_size_bytes(store_url: str) -> None:  # noqa: F811
    store = open_store(store_url)
    try:
        assert store.size_bytes() > 0
    finally:
        store.close()


def test_missing_folder_or_missing_source_is_refused_not_created(tmp_path: Path) -> None:
    """``must_exist`` (read-only commands on an explicit --db, copy-store's source): a
    missing database is an error, and nothing is created."""
    from kvcache_cli.errors import NotFoundError
    from kvcache_cli.services.copy_store import copy_store

    with pytest.raises(NotFoundError, match="no such database"):
        open_store(tmp_path / "nope" / "x.db", must_exist=True)
    assert not (tmp_path / "nope").exists()
    with pytest.raises(NotFoundError, match="no such database"):
        copy_store(str(tmp_path / "missing.db"), str(tmp_path / "dest.db"))
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "dest.db").exists()
