"""Where a store is: ``--db``/``KVCACHE_DB``/config text parsed into a backend and a target."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from kvcache_cli.errors import BadInputError
from kvcache_cli.paths import default_db_path


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store address: the backend and where it is."""

    backend: str
    target: str

    @property
    def display(self) -> str:
        """The location as shown to users: never with a password."""
        return redact_url(self.target) if self.backend == "postgresql" else self.target


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<invalid url>"
    query = re.sub(r"(?i)(^|&)(password)=[^&]*", r"\1\2=***", parts.query)
    if parts.password is None:
        return (
            url if query == parts.query else urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
        )
    host = parts.hostname or ""
    if port:
        host = f"{host}:{port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, query, ""))


def parse_location(url: str | os.PathLike[str] | None) -> StoreLocation:
    """Turn ``--db``/``KVCACHE_DB``/config text into a backend and a target."""
    text = os.fspath(url) if url is not None else ""
    text = text.strip()
    if not text:
        return StoreLocation("sqlite", str(default_db_path()))
    lowered = text.lower()
    if lowered.startswith(("postgresql://", "postgres://")):
        return StoreLocation("postgresql", text)
    if lowered.startswith("sqlite://"):
        rest = text[len("sqlite://") :]
        if not rest.startswith("/"):
            raise BadInputError(f"database URL {text!r}: use sqlite:///relative.db or sqlite:////absolute.db")
        return StoreLocation("sqlite", rest[1:] or ":memory:")
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise BadInputError(f"database URL {redact_url(text)!r}: unsupported scheme {scheme!r}")
    return StoreLocation("sqlite", str(Path(text).expanduser()))
