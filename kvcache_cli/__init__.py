"""kvcache: manage LLM conversation memory and KV cache.

Library use::

    from kvcache_cli import KVCacheManager, load_config, load_file, open_store

    store = open_store("/tmp/kv.db")
    manager = KVCacheManager(store, load_config())
    for conversation in load_file("chat.json"):
        manager.process_conversation(conversation, conversation.session_key or "chat")
    print(manager.retrieve("chat", "refund policy", (1, 2, 3), 5).entries)
    store.close()

Names are imported on first use, so ``import kvcache_cli`` stays cheap for the CLI.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "KVCacheManager": "kvcache_cli.services.manager",
    "open_store": "kvcache_cli.store.backend",
    "load_config": "kvcache_cli.config",
    "Config": "kvcache_cli.config",
    "load_file": "kvcache_cli.loaders",
    "Conversation": "kvcache_cli.loaders",
    "ChatMessage": "kvcache_cli.engine.entries",
    "ProcessResult": "kvcache_cli.services.results",
    "KVCacheError": "kvcache_cli.errors",
    "BadInputError": "kvcache_cli.errors",
    "ConfigError": "kvcache_cli.errors",
    "NotFoundError": "kvcache_cli.errors",
    "StoreError": "kvcache_cli.errors",
    "IntegrityError": "kvcache_cli.errors",
    "ServerError": "kvcache_cli.errors",
    "LockBusyError": "kvcache_cli.errors",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    """Lazy exports (see ``_EXPORTS``)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcache_cli' has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
