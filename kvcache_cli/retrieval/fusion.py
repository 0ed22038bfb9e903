"""Three-tier retrieval: active cache (1), snapshots (2), full history (3).

Keyword ranking is BM25 with the same tokenizer on every tier (``search_sqlite``);
semantic ranking uses stored message embeddings (``semantic``). Every result has a
similarity in [0, 1], the tier it came from and the query words it matched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvcache_cli.engine.entries import KVEntry

TIER_THRESHOLDS = {1: 0.3, 2: 0.4, 3: 0.5}


@dataclass
class RetrievedEntry:
    """One retrieval result: a tier's entry, its score and the keywords it matched."""

    tier: int
    score: float
    matched_keywords: list[str]
    text: str
    session_id: str
    message_index: int | None
    key_hash: str
    role: str | None = None
    snapshot_id: int | None = None
    stage: int = 0  # 1: a cascade's fill result, ranked after every first-stage result

    def to_dict(self, rank: int) -> dict[str, Any]:
        return {
            "rank": rank,
            "tier": self.tier,
            "score": round(self.score, 4),
            "matched_keywords": self.matched_keywords,
            "session_id": self.session_id,
            "message_index": self.message_index,
            "role": self.role,
            "snapshot_id": self.snapshot_id,
            "key_hash": self.key_hash,
            "text": self.text,
        }


@dataclass
class RetrievalResult:
    """What a retrieval found: the entries, tiers searched, keywords and bridge text."""

    query: str
    entries: list[RetrievedEntry] = field(default_factory=list)
    keywords_used: list[str] = field(default_factory=list)
    tiers_searched: list[int] = field(default_factory=list)
    strategy: str = "keyword_only"
    bridge_message: str | None = None
    search_duration_ms: float = 0.0
    notices: list[str] = field(default_factory=list)

    @property
    def average_similarity(self) -> float:
        if not self.entries:
            return 0.0
        return sum(e.score for e in self.entries) / len(self.entries)

    @property
    def primary_tier(self) -> int:
        """The deepest tier that contributed (the retrieval bridge names the max)."""
        return max((e.tier for e in self.entries), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "strategy": self.strategy,
            "keywords_used": self.keywords_used,
            "tiers_searched": self.tiers_searched,
            "entries_retrieved": len(self.entries),
            "average_similarity": round(self.average_similarity, 4),
            "bridge_message": self.bridge_message,
            "search_duration_ms": round(self.search_duration_ms, 2),
            "notices": self.notices,
            "results": [e.to_dict(i + 1) for i, e in enumerate(self.entries)],
        }


def rank_entries(
    query: str,
    entries: list[KVEntry],
    tier: int,
    session_key: str,
    snapshot_ids: list[int | None] | None = None,
    names: dict[int, str] | None = None,
    limit: int | None = None,
) -> list[RetrievedEntry]:
    """Rank cache or snapshot entries for ``query`` with the tier-3 method (``ranking``).

    Neighbour context follows the entries' message indexes; ``names`` maps a message
    index to its speaker (speaker boost). Only the best ``limit`` (all if None).
    """
    from kvcache_cli.store.search import rank_texts

    texts = [e.key_data or "" for e in entries]
    indexes = [e.message_index for e in entries]
    speakers = [names.get(i) if names and i is not None else None for i in indexes]
    out = []
    for index, score, matched in rank_texts(query, texts, indexes=indexes, names=speakers, limit=limit):
        entry = entries[index]
        out.append(
            RetrievedEntry(
                tier=tier,
                score=score,
                matched_keywords=matched,
                text=entry.key_data or "",
                session_id=session_key,
                message_index=entry.message_index,
                key_hash=entry.key_hash,
                role=str(entry.extra.get("role")) if entry.extra.get("role") else None,
                snapshot_id=snapshot_ids[index] if snapshot_ids else None,
            )
        )
    return out


def merge_results(results: list[RetrievedEntry], limit: int) -> list[RetrievedEntry]:
    """Best score first (a cascade's fill results last); one result per message."""
    ordered = sorted(
        results,
        key=lambda r: (
            r.stage,
            -r.score,
            r.tier,
            r.session_id,
            r.message_index if r.message_index is not None else -1,
            r.key_hash,
        ),
    )
    seen: set[tuple[str, Any]] = set()
    out = []
    for item in ordered:
        ident: tuple[str, Any] = (
            item.session_id,
            item.message_index if item.message_index is not None else item.key_hash,
        )
        if ident in seen:
            continue
        seen.add(ident)
        out.append(item)
        if len(out) >= limit:
            break
    return out
