"""Building the LLM client from ``[llm]`` and an optional ``--server`` URL.

Used by the CLI and the server alike, so both talk to the same endpoint the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvcache_cli.errors import BadInputError

if TYPE_CHECKING:
    from kvcache_cli.config import LLMConfig
    from kvcache_cli.llm.client import LLMClient


def llm_client(cfg: LLMConfig, server: str | None = None, required: bool = False) -> LLMClient | None:
    """The client for ``server`` (else ``cfg.base_url``); None when neither names a server.

    With only ``embeddings_url`` configured, the client serves embeddings and is marked
    ``embeddings_only`` (the manager then asks it for no summaries). ``required``: no
    server is a :class:`BadInputError`, and an embeddings-only endpoint does not count.
    """
    base = server or cfg.base_url
    embeddings_only = not base and bool(cfg.embeddings_url)
    if embeddings_only and not required:
        base = cfg.embeddings_url
    if not base:
        if required:
            raise BadInputError("this needs an LLM server: pass --server URL or set [llm].base_url")
        return None
    from kvcache_cli.llm.client import LLMClient, LLMSettings

    settings = LLMSettings(
        base_url=base,
        embeddings_url=cfg.embeddings_url or None,
        api_key_env=cfg.api_key_env or None,
        model=cfg.model,
        embedding_model=cfg.embedding_model or None,
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        retries=cfg.retries,
        backoff=cfg.backoff,
        summary_max_tokens=cfg.summary_max_tokens,
        embedding_batch_size=cfg.embedding_batch_size,
    )
    client = LLMClient(settings)
    client.embeddings_only = embeddings_only  # type: ignore[attr-defined]
    return client
