"""Stored session ids, for shell completion and pickers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvcache_cli.store import models as m

if TYPE_CHECKING:
    from kvcache_cli.store.backend import Store


def session_ids(store: Store, prefix: str = "", limit: int = 200) -> list[str]:
    """Up to ``limit`` session ids starting with ``prefix``, in order."""
    query = m.Session.select(m.Session.key).order_by(m.Session.key).tuples()
    return [key for (key,) in m.rows_of(store.bind(query)) if key.startswith(prefix)][:limit]
