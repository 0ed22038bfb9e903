"""PostgreSQL helpers for the tests: a fresh database per test, or a skip.

Set ``KVCACHE_TEST_PG_URL`` (``postgresql://user:pass@host:port/db``) to turn the
PostgreSQL variants on; ``.ci/run`` starts a local server and sets it (see
``.ci/start-postgres.sh``). Each test gets an empty database of its own: one created
from ``template0``, or one an earlier test of the same worker used and that was emptied
since (its ``public`` schema dropped and made anew: a tenth of the time of creating
and dropping a database); ``drop_spares`` drops those at the end of the run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

ENV = "KVCACHE_TEST_PG_URL"
PG_URL = os.environ.get(ENV, "").strip()

requires_pg = pytest.mark.skipif(not PG_URL, reason=f"set {ENV} to run the PostgreSQL tests")
BACKENDS = ["sqlite", "postgresql"]


def is_pg(url: str | os.PathLike[str]) -> bool:
    """Whether ``url`` names a PostgreSQL store."""
    return os.fspath(url).lower().startswith(("postgresql://", "postgres://"))


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def _admin() -> object:
    import psycopg2

    conn = psycopg2.connect(PG_URL)
    conn.autocommit = True
    return conn


def _admin_execute(sql: str, params: tuple[object, ...] = ()) -> None:
    """Run one statement on the server's maintenance connection (autocommit)."""
    conn = _admin()
    try:
        with conn.cursor() as cur:  # type: ignore[attr-defined]
            cur.execute(sql, params or None)
    finally:
        conn.close()  # type: ignore[attr-defined]


def create_database() -> str:
    """A new empty database on the test server; returns its URL."""
    name = "kvtest_" + uuid.uuid4().hex[:12]
    _admin_execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    return with_database(PG_URL, name)


def copy_database(url: str) -> str:
    """A new database holding what the database at ``url`` holds (made from it as a
    template: nothing may be connected to it); returns its URL."""
    name = "kvtest_" + uuid.uuid4().hex[:12]
    source = urlsplit(url).path.lstrip("/")
    _admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
    return with_database(PG_URL, name)


def drop_database(url: str) -> None:
    """Drop a database made by :func:`create_database` (ending its sessions)."""
    name = urlsplit(url).path.lstrip("/")
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


#: Emptied databases of earlier tests of this process, for the next ones to use.
_spares: list[str] = []


def empty_database() -> str:
    """An empty database: a spare one, else a new one (give it back with ``release``)."""
    return _spares.pop() if _spares else create_database()


def release(url: str) -> None:
    """Empty the database a test used and keep it for the next test; drop it if it
    cannot be emptied (ending whatever is still connected to it first)."""
    import psycopg2

    name = urlsplit(url).path.lstrip("/")
    try:
        _admin_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn = psycopg2.connect(url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '10s'")
                cur.execute("DROP SCHEMA public CASCADE")
                cur.execute("CREATE SCHEMA public")
        finally:
            conn.close()
    except psycopg2.Error:
        drop_database(url)
        return
    _spares.append(url)


def drop_spares() -> None:
    """Drop the emptied databases kept for reuse (at the end of the run)."""
    while _spares:
        drop_database(_spares.pop())


def _fresh_database() -> Iterator[str]:
    """An empty PostgreSQL database's URL, emptied afterwards (skips without a test server)."""
    if not PG_URL:
        pytest.skip(f"set {ENV} to run the PostgreSQL tests")
    url = empty_database()
    try:
        yield url
    finally:
        release(url)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database (skips when no test server is configured)."""
    yield from _fresh_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    """A store URL on each backend: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "kvcache.db")  # type: ignore[operator]
        return
    yield from _fresh_database()


@pytest.fixture(params=BACKENDS)
def store_factory(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Callable[[str], str]]:
    """Make several stores on one backend: ``make("one")`` is a SQLite file
    ``tmp_path/one.db``, or a fresh PostgreSQL database (all dropped afterwards)."""
    made: list[str] = []

    def make(name: str) -> str:
        if request.param == "sqlite":
            return str(tmp_path / f"{name}.db")
        url = empty_database()
        made.append(url)
        return url

    if request.param == "postgresql" and not PG_URL:
        pytest.skip(f"set {ENV} to run the PostgreSQL tests")
    try:
        yield make
    finally:
        for url in made:
            release(url)


# ----------------------------------------------------------------------------- reading a PG store
def pg_rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (``?`` placeholders) read with a plain psycopg2 connection."""
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params or None)
            rows = [tuple(r) for r in cur.fetchall()]
        conn.rollback()
        return rows
    finally:
        conn.close()


def pg_dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows (sorted) of a PostgreSQL store: compare before/after."""
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY 1"
            )
            names = [r[0] for r in cur.fetchall()]
            out: dict[str, list[tuple[Any, ...]]] = {}
            for name in names:
                cur.execute(f'SELECT * FROM "{name}"')
                out[name] = sorted((tuple(r) for r in cur.fetchall()), key=repr)
        conn.rollback()
        return out
    finally:
        conn.close()
