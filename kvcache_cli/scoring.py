"""Entry scoring (the seed's ``CacheEntryScorer``) and the text patterns it uses.

Score = sum of weighted parts clamped to [0, 1]: recency 0.3, access count 0.2, key
pattern 0.25, layer 0.1, head 0.05, value size 0.1, plus engagement x 0.3. Patterns are
case-insensitive (the seed's were case-sensitive English substrings).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from .entries import KVEntry

SYSTEM_PROMPT_RE = re.compile(r"\b(system|instructions?|prompt)\b|\byou are\b|\byour role\b", re.I)
CODE_RE = re.compile(
    r"```|\b(def|function|class|import|return|print|let|const|var|fn|struct|impl)\b|"
    r"\b(python|rust|javascript|typescript|java|golang|kotlin|swift|ruby|php|sql|bash|"
    r"c\+\+|c#|haskell|scala)\b",
    re.I,
)
IMPORTANT_RE = re.compile(
    r"\b(important|crucial|critical|essential|must|needs?|required?|requires|urgent|"
    r"priority|key|main|primary)\b",
    re.I,
)
QUESTION_START_RE = re.compile(
    r"^\s*(what|how|why|when|where|who|whom|whose|which|explain|describe|"
    r"can you|could you|would you|should you)\b",
    re.I,
)
NUMERIC_RE = re.compile(
    r"\d|%|\b(january|february|march|april|may|june|july|august|september|october|"
    r"november|december|monday|tuesday|wednesday|thursday|friday|saturday|sunday|"
    r"today|tomorrow|yesterday|tonight|hours?|minutes?|seconds?|days?|weeks?|months?|"
    r"years?|o'clock)\b",
    re.I,
)

STOP_WORDS = frozenset(
    "the a an and or but in on at to for of with by is am are was were be been being "
    "have has had do does did will would shall should may might must can could this "
    "that these those there their they them then than from into about your you".split()
)

ATTENTION_TYPES = frozenset({"attention_key", "attention_value"})
FFN_TYPES = frozenset({"ffn_key", "ffn_value"})
ENGAGEMENT_START = 0.3


def is_question(text: str) -> bool:
    """Ends with a question mark (any script's) or starts with a question word."""
    stripped = text.strip()
    return stripped.endswith(("?", "？", "؟")) or bool(QUESTION_START_RE.match(stripped))


PATTERN_WINDOW = 65536  # chars: a huge text is matched on its head and tail only


_PATTERN_CACHE: dict[str, tuple[str, ...]] = {}
_PATTERN_CACHE_MAX = 8192  # texts up to 4096 chars: at most ~32 MB
_PATTERN_CACHE_TEXT = 4096


def pattern_matches(text: str) -> list[str]:
    """Names of the seed's patterns that match ``text``, in the seed's order.

    A text longer than ``PATTERN_WINDOW`` is judged by its first and last halves of
    the window (a 50 MB message scores in milliseconds, not minutes). Results for
    short texts are remembered: a replay scores the same entries turn after turn.
    """
    if len(text) <= _PATTERN_CACHE_TEXT:
        cached = _PATTERN_CACHE.get(text)
        if cached is None:
            cached = tuple(_pattern_matches(text))
            if len(_PATTERN_CACHE) >= _PATTERN_CACHE_MAX:
                _PATTERN_CACHE.clear()
            _PATTERN_CACHE[text] = cached
        return list(cached)
    return _pattern_matches(text)


def _pattern_matches(text: str) -> list[str]:
    if len(text) > PATTERN_WINDOW:
        half = PATTERN_WINDOW // 2
        text = text[:half] + "\n" + text[-half:]
    found = []
    if SYSTEM_PROMPT_RE.search(text):
        found.append("system_prompt")
    if CODE_RE.search(text):
        found.append("code_block")
    if IMPORTANT_RE.search(text):
        found.append("important_concept")
    if is_question(text):
        found.append("question")
    if NUMERIC_RE.search(text):
        found.append("numeric_data")
    return found


PATTERN_SCORES = {
    "system_prompt": 0.8,
    "code_block": 0.7,
    "important_concept": 0.9,
    "question": 0.6,
    "numeric_data": 0.5,
}


def extract_keywords(text: str | None, limit: int = 5) -> list[str]:
    """Seed keywords: words over 3 chars, lower-cased, no stop words or repeats in a row."""
    if not text:
        return []
    words: list[str] = []
    for raw in text.split():
        word = raw.lower().strip(".,;:!?\"'()[]{}<>`*")
        if len(word) <= 3 or word in STOP_WORDS:
            continue
        if words and words[-1] == word:
            continue
        words.append(word)
        if len(words) >= limit:
            break
    return words


@dataclass(frozen=True)
class ScoringWeights:
    recency: float = 0.3
    access_count: float = 0.2
    key_pattern: float = 0.25
    layer: float = 0.1
    head: float = 0.05
    value_size: float = 0.1
    engagement: float = 0.3


class CacheEntryScorer:
    """Scores entries with the seed's weights; engagement comes from the store."""

    def __init__(self, weights: ScoringWeights | None = None) -> None:
        self.weights = weights or ScoringWeights()

    def key_pattern_score(self, entry: KVEntry) -> float:
        score = 0.0
        if entry.key_type in ATTENTION_TYPES:
            score += 0.1
        elif entry.key_type in FFN_TYPES:
            score += 0.05
        for name in pattern_matches(entry.key_data or ""):
            score += PATTERN_SCORES[name]
        return min(score, 1.0)

    def score(
        self,
        entry: KVEntry,
        now: datetime,
        engagement: Mapping[str, float] | None = None,
    ) -> float:
        """The entry's importance in [0, 1] at time ``now``."""
        w = self.weights
        if entry.last_accessed is not None:
            seconds = max(0.0, (now - entry.last_accessed).total_seconds())
        else:
            seconds = 0.0
        total = w.recency / (1.0 + seconds / 3600.0)
        total += w.access_count * min(entry.access_count, 100) / 100.0
        total += w.key_pattern * self.key_pattern_score(entry)
        layer = 0.9 if entry.layer_index < 10 else 0.7 if entry.layer_index < 20 else 0.5
        total += w.layer * layer
        if entry.head_index is not None:
            total += w.head * (0.8 if entry.head_index < 4 else 0.5)
        total += w.value_size * min(entry.value_bytes, 10000) / 10000.0
        level = (engagement or {}).get(entry.key_hash, ENGAGEMENT_START)
        total += w.engagement * level
        return max(0.0, min(1.0, total))


def next_engagement(current: float, retrieved: bool) -> float:
    """Seed: +0.15 when retrieved, +0.05 otherwise, clamped to [0.1, 1.0]."""
    return max(0.1, min(1.0, current + (0.15 if retrieved else 0.05)))


def decayed_engagement(current: float) -> float:
    """Seed: every key not touched decays x0.95 (floor 0.1)."""
    return max(0.1, current * 0.95)
