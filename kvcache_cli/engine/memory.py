"""The memory model: what an entry costs in KV bytes and what the cache can hold.

Without a server, tokens are estimated as ``ceil(characters / 4)`` plus 4 tokens of chat
template per message: close to what Llama-3/Mistral BPE tokenizers give on English
prose (within ~15%), pessimistic on code. With a server, ``/tokenize`` counts them.
An entry's size is ``tokens x bytes_per_token`` of the model geometry (default: 32
layers x 8 KV heads x 128 dims x 2 (K and V) x 2 bytes = 128 KiB per token).

Capacity: ``model.max_cache_bytes`` if set, else ``n_ctx x bytes_per_token`` (``n_ctx``
from the config, or from the server's ``/slots``), else the built-in estimate
(``max_cache_entries x 1024`` if > 0, else 25% of available RAM clamped to 256 MB..8 GB).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvcache_cli.config import CacheConfig, ModelConfig

TEMPLATE_TOKENS = 4
MIB = 1024 * 1024
GIB = 1024 * MIB


def estimate_tokens(text: str) -> int:
    """Token estimate for one chat message without a tokenizer."""
    return (len(text) + 3) // 4 + TEMPLATE_TOKENS


def fallback_capacity_estimate(cache: CacheConfig) -> int:
    """Without a model size or n_ctx: entries x 1 KiB, else 25% of available RAM (256 MB..8 GB)."""
    if cache.max_cache_entries > 0:
        return cache.max_cache_entries * 1024
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:
        return GIB
    if available <= 0:
        return GIB
    return max(256 * MIB, min(8 * GIB, available // 4))


def capacity_bytes(model: ModelConfig, cache: CacheConfig, server_n_ctx: int | None = None) -> int:
    """Cache capacity in bytes by the documented order of precedence."""
    if model.max_cache_bytes > 0:
        return model.max_cache_bytes
    n_ctx = server_n_ctx or model.n_ctx
    if n_ctx > 0:
        return n_ctx * model.bytes_per_token
    return fallback_capacity_estimate(cache)


@dataclass
class TokenCounter:
    """Counts tokens by the server's ``/tokenize`` when given, else estimates."""

    remote: Callable[[list[str]], list[int]] | None = None
    failure: str | None = None  # why the server stopped being asked (then: estimates)

    @property
    def source(self) -> str:
        return "server" if self.remote else "estimate"

    def count(self, texts: list[str]) -> list[int]:
        """Counts per text; a server failure switches to estimates for good (see ``failure``)."""
        if self.remote is not None and texts:
            from kvcache_cli.errors import ServerError

            try:
                return [n + TEMPLATE_TOKENS for n in self.remote(texts)]
            except ServerError as exc:
                self.failure = str(exc)
                self.remote = None
        return [estimate_tokens(t) for t in texts]
