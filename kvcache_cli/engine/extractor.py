"""Classification and preservation of entries at a clear (see docs/design.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from kvcache_cli.engine.entries import KVEntry
from kvcache_cli.engine.scoring import (
    CODE_RE,
    IMPORTANT_RE,
    NUMERIC_RE,
    PATTERN_WINDOW,
    SYSTEM_PROMPT_RE,
    CacheEntryScorer,
    extract_keywords,
    is_question,
    matched_patterns,
)

MIN_VALUE_BYTES = 10
MAX_VALUE_BYTES = 10_000


@dataclass
class ExtractedEntry:
    """An entry considered at a clear: its class, importance and keywords."""

    entry: KVEntry
    entry_type: str
    importance: float
    keywords: list[str]


def classify(entry: KVEntry) -> str:
    """The first matching class: system prompt, code, important, question, numeric, else type."""
    if entry.key_type == "system_prompt":
        return "system_prompt"
    text = entry.key_data or ""
    if len(text) <= PATTERN_WINDOW:
        # Same tests in the same order as below, and no windowing at this length:
        # reuses the (cached) matches from scoring. Changes speed only, never results.
        names = matched_patterns(text)
        return names[0] if names else entry.key_type or "attention_key"
    if SYSTEM_PROMPT_RE.search(text):
        return "system_prompt"
    if CODE_RE.search(text):
        return "code_block"
    if IMPORTANT_RE.search(text):
        return "important_concept"
    if is_question(text):
        return "question"
    if NUMERIC_RE.search(text):
        return "numeric_data"
    return entry.key_type or "attention_key"


def extract_entries(
    entries: list[KVEntry],
    scorer: CacheEntryScorer,
    now: datetime,
    engagement: Mapping[str, float] | None = None,
) -> list[ExtractedEntry]:
    """Entries with 10..10,000 value bytes, classified and scored, best first.

    Ties are broken by key hash so the order never depends on input order. The
    conversation's own system messages (key type ``system_prompt``) are never skipped
    for their size.
    """
    out = []
    for entry in entries:
        sized = MIN_VALUE_BYTES <= entry.value_bytes <= MAX_VALUE_BYTES
        if not sized and entry.key_type != "system_prompt":
            continue
        importance = scorer.score(entry, now, engagement)
        out.append(ExtractedEntry(entry, classify(entry), importance, extract_keywords(entry.key_data)))
    out.sort(key=lambda e: (-e.importance, e.entry.key_hash))
    return out


def filter_preserved(
    extracted: list[ExtractedEntry],
    min_importance: float,
    preserve_system_prompts: bool,
    preserve_code_entries: bool,
) -> list[ExtractedEntry]:
    """The reference preservation rule; anything unlisted needs 1.2 x the threshold.

    One addition: the conversation's own system messages (entries whose key type is
    ``system_prompt``, i.e. role ``system``) are kept whenever
    ``preserve_system_prompts`` is on, whatever their score: a server re-sends the
    system prompt with every request, so dropping it from the cache only costs a
    re-prefill. Text that merely *looks* like a system prompt follows the reference rule.
    """
    kept = []
    for item in extracted:
        if preserve_system_prompts and item.entry.key_type == "system_prompt":
            kept.append(item)
            continue
        if item.importance < min_importance:
            continue
        kind = item.entry_type
        if kind == "system_prompt":
            keep = preserve_system_prompts
        elif kind == "code_block":
            keep = preserve_code_entries
        elif kind in ("important_concept", "attention_key", "attention_value"):
            keep = True
        else:
            keep = item.importance >= min_importance * 1.2
        if keep:
            kept.append(item)
    return kept


#: Share of the memory threshold that the entries kept at a clear may fill.
PRESERVE_SHARE = 0.5


def fit_to_budget(preserved: list[ExtractedEntry], budget_bytes: int) -> list[ExtractedEntry]:
    """The preserved entries that fit in ``budget_bytes``, most important first.

    Not in the reference design, whose preservation ignores size: a clear triggered by memory that
    keeps every important (often long) entry frees nothing, and the next turn is over
    the threshold again. kvcache keeps at most half the threshold's worth of bytes
    (``PRESERVE_SHARE``), so that every clear makes room. The conversation's own
    system messages are kept first, whatever their size.
    """
    if budget_bytes <= 0:
        return preserved
    system = [p for p in preserved if p.entry.key_type == "system_prompt"]
    used = sum(p.entry.size_bytes for p in system)
    kept = list(system)
    for item in preserved:
        if item.entry.key_type == "system_prompt":
            continue
        if used + item.entry.size_bytes <= budget_bytes:
            kept.append(item)
            used += item.entry.size_bytes
    order = {id(p): i for i, p in enumerate(preserved)}
    return sorted(kept, key=lambda p: order[id(p)])
