"""Plain data types shared by the core: chat messages and KV-cache entries."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kvcache_cli.errors import BadInputError

ROLES = ("system", "developer", "user", "assistant", "function", "tool")
SYSTEM_ROLES = frozenset({"system", "developer"})
"""Roles that instruct the model (OpenAI's ``developer`` is its newer name for ``system``)."""


@dataclass
class ChatMessage:
    """One message of a conversation, as loaded from a file or the store."""

    role: str
    content: str
    timestamp: datetime | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name:
            data["name"] = self.name
        return data


@dataclass
class KVEntry:
    """One entry of a KV cache: its key text, value size, place in the model and score.

    ``value_bytes`` is the size of the entry's value data (what the reference extractor
    and scorer look at); ``size_bytes`` is the KV memory it occupies (what the memory
    threshold adds up): tokens x bytes per token of the model geometry.
    """

    key_hash: str
    key_data: str | None
    key_type: str = "attention_key"
    value_bytes: int = 0
    layer_index: int = 0
    head_index: int | None = None
    importance_score: float = 0.5
    access_count: int = 1
    last_accessed: datetime | None = None
    size_bytes: int = 0
    tokens: int = 0
    message_index: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The fields that define the entry (what a snapshot hash covers)."""
        return {
            "key_hash": self.key_hash,
            "key_data": self.key_data,
            "key_type": self.key_type,
            "value_bytes": self.value_bytes,
            "layer_index": self.layer_index,
            "head_index": self.head_index,
            "importance_score": round(self.importance_score, 9),
            "access_count": self.access_count,
            "size_bytes": self.size_bytes,
            "tokens": self.tokens,
            "message_index": self.message_index,
        }

    def to_dict(self) -> dict[str, Any]:
        data = self.identity()
        data["last_accessed"] = self.last_accessed.isoformat() if self.last_accessed else None
        return data


def entries_hash(entries: list[KVEntry]) -> str:
    """SHA-256 over the entries' identities in key order: integrity and de-duplication."""
    items = sorted((e.identity() for e in entries), key=lambda d: (d["key_hash"], d["layer_index"]))
    blob = json.dumps(items, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def key_hash_for(session_key: str, message_index: int, content: str) -> str:
    """Stable key hash of an entry derived from a message."""
    digest = hashlib.sha256(f"{session_key}\x00{message_index}\x00{content}".encode())
    return digest.hexdigest()[:32]


def stored_prefix(
    stored: Iterable[tuple[int, str, str]], messages: Sequence[ChatMessage], label: str, session_key: str
) -> int:
    """How many of ``messages`` a session stores already, from its stored
    ``(message_index, role, content)`` rows in index order.

    A file may extend a stored conversation, never rewrite it: a stored message that
    differs from the file's is refused (``BadInputError`` naming the file and index).
    """
    count = 0
    for index, role, content in stored:
        if index >= len(messages):
            break
        msg = messages[index]
        if msg.role != role or msg.content != content:
            raise BadInputError(
                f"{label}: session {session_key!r}: message {index} differs from the "
                "stored conversation (the file must extend it, not rewrite it)"
            )
        count += 1
    return count
