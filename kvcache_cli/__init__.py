"""kvcache: manage LLM conversation memory and KV cache.

Library use::

    from kvcache_cli import open_store
    from kvcache_cli import KVCacheManager
    from kvcache_cli import load_config
    store = open_store("/tmp/kv.db")
    manager = KVCacheManager(store, load_config())
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["KVCacheManager", "load_config", "load_file", "open_store", "__version__"]


def __getattr__(name: str) -> Any:
    """Lazy exports, so that ``import kvcache_cli`` stays cheap for the CLI."""
    if name == "KVCacheManager":
        from kvcache_cli.services.manager import KVCacheManager

        return KVCacheManager
    if name == "open_store":
        from kvcache_cli.store.backend import open_store

        return open_store
    if name == "load_config":
        from kvcache_cli.config import load_config

        return load_config
    if name == "load_file":
        from kvcache_cli.loaders import load_file

        return load_file
    raise AttributeError(name)
