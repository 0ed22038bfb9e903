"""Connecting to PostgreSQL: URL parsing, the optional driver, redacted errors.

The driver (``psycopg2``) is an optional extra: ``pip install 'kvcache-cli[postgres]'``.
It is imported only when a ``postgresql://`` URL is opened. No error or message
built here ever contains the password.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import peewee

from kvcache_cli.errors import BadInputError, StoreError
from kvcache_cli.store.location import redact_url

DRIVER_MISSING = "PostgreSQL support needs the driver: pip install 'kvcache-cli[postgres]'"

#: Seconds to wait for the server when connecting (unless the URL sets connect_timeout).
CONNECT_TIMEOUT = 10


def connect_params(url: str) -> dict[str, Any]:
    """psycopg2 connection parameters from ``postgresql://user:pass@host:port/dbname?opt=v``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadInputError(f"database URL {redact_url(url)!r}: {exc}") from None
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise BadInputError(f"database URL {redact_url(url)!r}: not a postgresql:// URL")
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise BadInputError(f"database URL {redact_url(url)!r}: no database name (…/dbname)")
    params: dict[str, Any] = {"database": dbname}
    if parts.hostname:
        params["host"] = unquote(parts.hostname)
    if port:
        params["port"] = port
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password is not None:
        params["password"] = unquote(parts.password)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "host":  # postgresql:///db?host=/run/postgresql (a socket folder)
            params["host"] = value
        else:
            params[key] = value
    params.setdefault("connect_timeout", CONNECT_TIMEOUT)
    params.setdefault("application_name", "kvcache")
    return params


def _redact(text: str, params: dict[str, Any]) -> str:
    """``text`` with the password (if any) replaced, whatever the driver put in it."""
    secret = params.get("password")
    text = " ".join(str(text).split())  # one line
    if secret:
        text = text.replace(str(secret), "***")
    return text


def open_postgres(url: str) -> peewee.PostgresqlDatabase:
    """A connected peewee PostgreSQL database for ``url`` (errors redacted, one line)."""
    params = connect_params(url)
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise StoreError(DRIVER_MISSING) from None
    database = params.pop("database")
    # FloatField is REAL (4 bytes) on PostgreSQL by default: SQLite stores 8-byte
    # doubles, and scores must be the same on both backends.
    db = peewee.PostgresqlDatabase(database, field_types={"FLOAT": "DOUBLE PRECISION"}, **params)
    try:
        db.connect()
        db.execute_sql("SET TIME ZONE 'UTC'")
    except (peewee.DatabaseError, peewee.InterfaceError) as exc:
        if not db.is_closed():
            db.close()
        params["password"] = _password(url) or params.get("password")
        raise StoreError(
            f"{redact_url(url)}: cannot connect to PostgreSQL ({_redact(str(exc), params)})"
        ) from None
    return db


def _password(url: str) -> str | None:
    try:
        secret = urlsplit(url).password
    except ValueError:
        return None
    return unquote(secret) if secret else None
