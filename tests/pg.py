"""PostgreSQL helpers for the tests: a fresh database per test, or a skip.

Set ``KVCACHE_TEST_PG_URL`` (``postgresql://user:pass@host:port/db``) to turn the
PostgreSQL variants on; ``.ci/run`` starts a local server and sets it (see
``.ci/start-postgres.sh``). Each test gets its own database, created from
``template0`` and dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

ENV = "KVCACHE_TEST_PG_URL"
PG_URL = os.environ.get(ENV, "").strip()

requires_pg = pytest.mark.skipif(not PG_URL, reason=f"set {ENV} to run the PostgreSQL tests")


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def _admin() -> object:
    import psycopg2

    conn = psycopg2.connect(PG_URL)
    conn.autocommit = True
    return conn


def create_database() -> str:
    """A new empty database on the test server; returns its URL."""
    name = "kvtest_" + uuid.uuid4().hex[:12]
    conn = _admin()
    try:
        with conn.cursor() as cur:  # type: ignore[attr-defined]
            cur.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        conn.close()  # type: ignore[attr-defined]
    return with_database(PG_URL, name)


def drop_database(url: str) -> None:
    """Drop a database made by :func:`create_database` (ending its sessions)."""
    name = urlsplit(url).path.lstrip("/")
    conn = _admin()
    try:
        with conn.cursor() as cur:  # type: ignore[attr-defined]
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()  # type: ignore[attr-defined]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database (skips when no test server is configured)."""
    if not PG_URL:
        pytest.skip(f"set {ENV} to run the PostgreSQL tests")
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    """A store URL on each backend: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "kvcache.db")  # type: ignore[operator]
        return
    if not PG_URL:
        pytest.skip(f"set {ENV} to run the PostgreSQL tests")
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)
