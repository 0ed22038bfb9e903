"""An open store: SQLite pragmas and file safety, transactions, raw queries, locks.

SQLite is the embedded default: WAL, foreign keys, ``synchronous=NORMAL``, a busy
timeout, and ``BEGIN IMMEDIATE`` for every transaction so that writers queue for the
lock up front instead of failing half-way. The database file is created 0600 in a
0700 folder, and an existing file that is not SQLite is never written over.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import peewee

from kvcache_cli.errors import BadInputError, LockBusyError, NotFoundError, StoreError
from kvcache_cli.paths import default_db_path, ensure_private_dir
from kvcache_cli.store.location import StoreLocation

T = TypeVar("T")
Q = TypeVar("Q", bound=peewee.BaseQuery)

SQLITE_MAGIC = b"SQLite format 3\x00"
LOCK_RETRIES = 8


def _prepare_sqlite_file(path: str, must_exist: bool = False) -> None:
    """Check an existing file is SQLite, or create it 0600 (its folders 0700)."""
    if path == ":memory:":
        return
    file = Path(path)
    if file.is_dir():
        raise BadInputError(f"{path}: is a directory, not a database file")
    if file.exists():
        try:
            with file.open("rb") as handle:
                header = handle.read(len(SQLITE_MAGIC))
        except OSError as exc:
            raise StoreError(f"{path}: cannot read database ({exc.strerror})") from None
        if header and header != SQLITE_MAGIC:
            raise StoreError(f"{path}: not a SQLite database (refusing to touch it)")
        return
    if must_exist:
        raise NotFoundError(f"{path}: no such database")
    parent = file.parent
    if not parent.exists():
        if file != default_db_path():  # only the default location is created: a missing folder is a typo
            raise BadInputError(f"{path}: folder {parent} does not exist (create it first)")
        ensure_private_dir(parent)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"{path}: cannot create database ({exc.strerror})") from None


AUTOCHECKPOINT_PAGES = 4000
BACKSTOP_PAGES = 100_000  # 400 MB: reached only when the opener's own checkpoints stop


def open_sqlite(
    path: str, busy_timeout_ms: int = 30000, must_exist: bool = False, autocheckpoint: bool = True
) -> peewee.SqliteDatabase:
    """A connected SQLite database with the store's pragmas.

    ``autocheckpoint=False``: commits checkpoint the write-ahead log only past
    ``BACKSTOP_PAGES`` (a checkpoint copies the log into the database file and syncs
    it: tens to hundreds of milliseconds on a large store, paid by whichever commit
    crosses the threshold); the opener checkpoints it with :meth:`Store.checkpoint`,
    off its latency-sensitive path, and the backstop bounds the log if that stops.
    """
    _prepare_sqlite_file(path, must_exist)
    db = peewee.SqliteDatabase(
        path,
        pragmas={
            "journal_mode": "wal",
            "foreign_keys": 1,
            "synchronous": "normal",
            "busy_timeout": busy_timeout_ms,
            # checkpoint every 4,000 WAL pages (16 MB), not SQLite's 1,000: a replay
            # rewrites the same hot pages turn after turn, and each checkpoint syncs the
            # file (commits were a tenth of a replay; this takes a quarter off them)
            "wal_autocheckpoint": AUTOCHECKPOINT_PAGES if autocheckpoint else BACKSTOP_PAGES,
        },
        timeout=busy_timeout_ms / 1000.0,
        lock_type="IMMEDIATE",
    )
    try:
        db.connect()
        db.execute_sql("SELECT count(*) FROM sqlite_master").fetchone()
    except (peewee.DatabaseError, sqlite3.DatabaseError) as exc:
        db.close()
        raise StoreError(f"{path}: not a usable SQLite database ({exc})") from None
    return db


def is_locked_error(exc: BaseException) -> bool:
    """Whether ``exc`` is worth a retry: SQLite's "database is locked"/"busy", or a
    PostgreSQL deadlock or serialization failure (the transaction was rolled back)."""
    text = str(exc).lower()
    markers = ("database is locked", "database is busy", "deadlock detected", "could not serialize access")
    return any(marker in text for marker in markers)


class Store:
    """An open store: the peewee database, its backend and the transaction helper."""

    def __init__(self, db: peewee.Database, location: StoreLocation) -> None:
        self.db = db
        self.location = location
        # read-side caches that belong to this open store (e.g. a session's vectors,
        # checked against the rows on every use): never shared with another store
        self.memo: dict[str, Any] = {}

    def bind(self, query: Q) -> Q:
        """``query`` (a peewee query of the unbound models) run against this store.

        The models in ``models`` belong to no database: every ORM query names its
        store, so two open stores (or threads serving them) never share a binding.
        """
        query.bind(self.db)
        return query

    @property
    def backend(self) -> str:
        return self.location.backend

    @property
    def is_sqlite(self) -> bool:
        return self.location.backend == "sqlite"

    def transaction(self, work: Callable[[], T], on_rollback: Callable[[], None] | None = None) -> T:
        """Run ``work`` in one write transaction, retrying when the database is busy.

        The whole unit of work is rolled back on any error, so a retry starts clean;
        ``on_rollback`` is called after each rolled-back attempt (to drop state read
        inside it).
        """
        for attempt in range(LOCK_RETRIES + 1):
            try:
                try:
                    with self.db.atomic():
                        return work()
                except BaseException:
                    if on_rollback is not None:
                        on_rollback()
                    raise
            except peewee.OperationalError as exc:
                if not is_locked_error(exc) or attempt == LOCK_RETRIES:
                    if is_locked_error(exc):
                        raise StoreError(
                            f"{self.location.display}: database stayed busy; try again"
                        ) from None
                    raise StoreError(f"{self.location.display}: {exc}") from None
                time.sleep(min(2.0, 0.05 * (2**attempt)) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def query(self, text: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a raw query written with ``?`` marks (translated for PostgreSQL)."""
        if not self.is_sqlite:
            text = text.replace("?", "%s")
        cursor = self.db.execute_sql(text, params)
        if cursor.description is None:  # a statement without rows (psycopg would refuse fetchall)
            return []
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        return rows

    def checkpoint(self) -> tuple[int, int]:
        """Copy what the SQLite write-ahead log holds into the database file without
        waiting for readers or writers (``PASSIVE``); (frames in the log, frames
        checkpointed). PostgreSQL: nothing to do, (0, 0)."""
        if not self.is_sqlite:
            return 0, 0
        row = self.db.execute_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return (int(row[1]), int(row[2])) if row else (0, 0)

    def size_bytes(self) -> int:
        """Bytes the store takes on disk (database plus WAL for SQLite)."""
        if self.is_sqlite:
            target = self.location.target
            if target == ":memory:":
                return 0
            return sum(os.path.getsize(p) for p in (target, target + "-wal") if os.path.exists(p))
        row = self.db.execute_sql("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0]) if row else 0

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """A store-wide lock for ``name`` held by one process at a time (non-blocking).

        SQLite: an ``flock`` on a file beside the database (released by the kernel if
        the process dies). PostgreSQL: a session-level advisory lock.
        """
        if not self.is_sqlite:
            key = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "big") & 0x7FFFFFFFFFFFFFFF
            row = self.db.execute_sql("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if not row or not row[0]:
                raise LockBusyError(f"another kvcache {name} is running on this store")
            try:
                yield
            finally:
                self.db.execute_sql("SELECT pg_advisory_unlock(%s)", (key,))
            return
        import fcntl

        target = self.location.target
        lock_path = (target if target != ":memory:" else "/tmp/kvcache-memory") + f".{name}.lock"
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockBusyError(f"another kvcache {name} is running on this store") from None
            yield
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the connection. A transaction still open here was torn by a Ctrl-C that
        landed inside peewee's ``atomic()`` entry, after its BEGIN and before the ``with``
        block could end it: nothing of it was committed, so it is rolled back (peewee
        would refuse to close)."""
        if self.db.is_closed():
            return
        if self.db.in_transaction():
            while self.db.transaction_depth():
                self.db.pop_transaction()
            with contextlib.suppress(peewee.DatabaseError):
                self.db.rollback()
        self.db.close()
