"""The turn decision over plain data: when to clear, what to keep, when to snapshot,
when to retrieve, and the cache entries a turn's messages make.

No database and no HTTP: the turn services (``services.turns``, ``services.cache_ops``)
read the state from the store, ask these functions, and write what they decide.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from kvcache_cli.config import CacheConfig, SnapshotConfig
from kvcache_cli.engine.entries import SYSTEM_ROLES, ChatMessage, KVEntry, key_hash_for
from kvcache_cli.engine.extractor import (
    PRESERVE_SHARE,
    ExtractedEntry,
    extract_entries,
    filter_preserved,
    fit_to_budget,
)
from kvcache_cli.engine.scoring import CacheEntryScorer
from kvcache_cli.errors import BadInputError

RETRIEVAL_TRIGGERS = ("explain", "how to", "what is", "remember", "recall")
CONVERSATION_LIMIT = "ConversationLimit"
MEMORY_THRESHOLD = "MemoryThreshold"


def split_turns(messages: list[ChatMessage]) -> list[tuple[int, int]]:
    """``(start, end)`` index ranges of turns: a user message and the replies after it.

    Messages before the first user message join the first turn; a conversation with
    no user message is one turn without a question.
    """
    user_positions = [i for i, msg in enumerate(messages) if msg.role == "user"]
    if not user_positions:
        return [(0, len(messages))] if messages else []
    bounds = []
    for n, pos in enumerate(user_positions):
        start = 0 if n == 0 else pos
        end = user_positions[n + 1] if n + 1 < len(user_positions) else len(messages)
        bounds.append((start, end))
    return bounds


def should_retrieve(text: str) -> bool:
    """Whether a question asks for past context: a question mark in any script, a long
    message, code, or a recall phrase (case-insensitive)."""
    if not text.strip():
        return False
    lowered = text.casefold()
    return (
        any(mark in text for mark in ("?", "？", "؟"))
        or len(text) > 100
        or "```" in text
        or any(trigger in lowered for trigger in RETRIEVAL_TRIGGERS)
    )


def clear_reason(conversations: int, usage: int, capacity: int, cfg: CacheConfig) -> str | None:
    """Why the turn that brings the count to ``conversations`` and the cache to ``usage``
    bytes must clear (the turn trigger wins), or None."""
    if conversations >= cfg.clear_after_conversations:
        return CONVERSATION_LIMIT
    if capacity > 0 and usage / capacity >= cfg.memory_threshold_percent:
        return MEMORY_THRESHOLD
    return None


def entries_to_keep(
    active: list[KVEntry],
    scorer: CacheEntryScorer,
    now: datetime,
    engagement: dict[str, float],
    cfg: CacheConfig,
    capacity: int,
) -> list[ExtractedEntry]:
    """The entries a clear preserves: important enough, of a preserved kind, and within
    ``PRESERVE_SHARE`` of the memory threshold's bytes; most important first."""
    extracted = extract_entries(active, scorer, now, engagement)
    preserved = filter_preserved(
        extracted, cfg.min_importance_to_preserve, cfg.preserve_system_prompts, cfg.preserve_code_entries
    )
    budget = int(capacity * cfg.memory_threshold_percent * PRESERVE_SHARE)
    return fit_to_budget(preserved, budget)


def snapshot_on_clear(cfg: CacheConfig, reason: str) -> bool:
    """Whether a clear for ``reason`` snapshots the cache first (incremental: turn limit only)."""
    kind = cfg.snapshot.strategy
    if not cfg.enabled or kind == "none":
        return False
    if kind == "incremental":
        return reason == CONVERSATION_LIMIT
    return True


def periodic_snapshot_due(cfg: CacheConfig, turn_count: int, has_entries: bool) -> bool:
    """Whether turn ``turn_count`` takes the strategy's interval snapshot."""
    snap = cfg.snapshot
    if not cfg.enabled or snap.strategy == "none" or snap.interval_conversations <= 0:
        return False
    return turn_count % snap.interval_conversations == 0 and has_entries


def snapshot_content(snap: SnapshotConfig, entries: list[KVEntry]) -> tuple[str, list[KVEntry]] | None:
    """The snapshot type and the entries it holds (adaptive: the important ones; None if none)."""
    kind = snap.strategy if snap.strategy != "none" else "full"
    if kind == "adaptive":
        entries = [e for e in entries if e.importance_score >= snap.min_importance_threshold]
        if not entries:
            return None
        return "checkpoint", entries
    return kind, entries


def message_entries(
    session_key: str,
    start: int,
    messages: list[ChatMessage],
    tokens: list[int],
    now: datetime,
    bytes_per_token: int,
    scorer: CacheEntryScorer,
) -> list[KVEntry]:
    """One entry per message: its text as key, its tokens x bytes/token as size."""
    out = []
    for offset, (msg, count) in enumerate(zip(messages, tokens, strict=True)):
        index = start + offset
        entry = KVEntry(
            key_hash=key_hash_for(session_key, index, msg.content),
            key_data=msg.content,
            key_type="system_prompt" if msg.role in SYSTEM_ROLES else "attention_key",
            value_bytes=len(msg.content.encode("utf-8")),
            last_accessed=msg.timestamp or now,
            size_bytes=count * bytes_per_token,
            tokens=count,
            message_index=index,
        )
        entry.importance_score = scorer.score(entry, now)
        out.append(entry)
    return out


def file_entries(
    raw_entries: list[dict[str, Any]],
    place: str,
    session_key: str,
    lo: int,
    hi: int,
    now: datetime,
    bytes_per_token: int,
    scorer: CacheEntryScorer,
    count_tokens: Callable[[list[str]], list[int]],
) -> list[KVEntry]:
    """A conversation file's own ``kv_entries`` that enter the cache with messages lo..hi-1."""
    out = []
    for i, raw in enumerate(raw_entries):
        where = f"{place}kv_entries[{i}]"
        index = raw.get("message_index", 0)
        if not isinstance(index, int) or isinstance(index, bool):
            raise BadInputError(f"{where}.message_index: must be a whole number")
        if not lo <= index < hi:
            continue
        text = raw.get("key_data", raw.get("text"))
        value = raw.get("value_data")
        value_bytes = raw.get("value_bytes")
        if value_bytes is None:
            value_bytes = len(value.encode("utf-8")) if isinstance(value, str) else len(text or "")
        tokens = raw.get("tokens") or count_tokens([text or ""])[0]
        try:
            entry = KVEntry(
                key_hash=str(raw.get("key_hash") or key_hash_for(session_key, -1 - i, text or "")),
                key_data=text,
                key_type=str(raw.get("key_type", "attention_key")),
                value_bytes=int(value_bytes),
                layer_index=int(raw.get("layer_index", 0)),
                head_index=None if raw.get("head_index") is None else int(raw["head_index"]),
                access_count=int(raw.get("access_count", 1)),
                last_accessed=now,
                size_bytes=int(raw.get("size_bytes") or int(tokens) * bytes_per_token),
                tokens=int(tokens),
                message_index=index,
            )
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"{where}: {exc}") from None
        if raw.get("importance_score") is not None:
            entry.importance_score = float(raw["importance_score"])
        else:
            entry.importance_score = scorer.score(entry, now)
        out.append(entry)
    return out
