"""What ``kvcache stats`` shows: the store's statistics, insights, and the server's slots.

The store part never depends on the server: when the server cannot be reached the
report still has everything from the store, plus ``server: {url, error}``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from kvcache_cli.errors import ServerError

if TYPE_CHECKING:
    from kvcache_cli.config import Config
    from kvcache_cli.llm.client import LLMClient
    from kvcache_cli.store.backend import Store


def _shown(url: str) -> str:
    """``url`` without user, password, query or fragment (it may carry credentials)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def store_report(store: Store, config: Config, session: str | None, history: int) -> dict[str, Any]:
    """The store's statistics with their insights (no server involved).

    Built on the services' shared ``Core`` rather than the whole ``KVCacheManager``, so
    ``kvcache stats`` does not import the replay and retrieval services it never uses.
    """
    from kvcache_cli.services.core import Core
    from kvcache_cli.services.insights import compute as compute_insights
    from kvcache_cli.services.stats import statistics

    data = statistics(Core(store, config), session, history)
    data["insights"] = compute_insights(store, config)
    return data


def add_server_slots(
    data: dict[str, Any], client: LLMClient | None, configured_only: bool
) -> ServerError | None:
    """Add the server's slots to ``data``; a failure goes under ``server`` (and, for a
    server that was configured rather than asked for, ``slots_error``) and is returned."""
    if client is None:
        return None
    try:
        data["slots"] = [dataclasses.asdict(s) for s in client.slots()]
    except ServerError as exc:
        data["server"] = {"url": _shown(client.settings.base_url or ""), "error": str(exc)}
        if configured_only:
            data["slots_error"] = str(exc)
        return exc
    finally:
        client.close()
    return None
