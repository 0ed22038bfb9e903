"""Entry scoring (weights and patterns of the reference design, docs/design.md) and its text patterns.

Score = sum of weighted parts clamped to [0, 1]: recency 0.3, access count 0.2, key
pattern 0.25, layer 0.1, head 0.05, value size 0.1, plus engagement x 0.3. Patterns are
case-insensitive (the reference ones were case-sensitive English substrings).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from kvcache_cli.engine.entries import KVEntry

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

# Fast, exact evaluation of the patterns on ASCII text (changes speed only, never results).
# On ASCII text ``re.I`` is ASCII case-insensitivity and ``\w`` is [A-Za-z0-9_]. Folding
# maps A-Z to a-z and every other non-word char to a space, so the folded text's words are
# the text's maximal \w runs, lower-cased, and ``\b(w1|w2|...)\b`` matches iff one of them
# is listed. A pattern's other branches (phrases, "c++", ...) run its original regex, and
# only when the text holds what each of their matches holds (e.g. "o'clock" -> "o clock").
SYSTEM_WORDS = frozenset({"system", "instruction", "instructions", "prompt"})
CODE_WORDS = frozenset(
    "def function class import return print let const var fn struct impl python rust javascript "
    "typescript java golang kotlin swift ruby php sql bash haskell scala".split()
)
IMPORTANT_WORDS = frozenset(
    "important crucial critical essential must need needs require required requires urgent "
    "priority key main primary".split()
)
NUMERIC_WORDS = frozenset(
    "january february march april may june july august september october november december "
    "monday tuesday wednesday thursday friday saturday sunday today tomorrow yesterday tonight "
    "hour hours minute minutes second seconds day days week weeks month months year years".split()
)
_DIGIT_OR_PERCENT_RE = re.compile(r"[\d%]")  # NUMERIC_RE's first two branches
_PATTERN_WORDS = SYSTEM_WORDS | CODE_WORDS | IMPORTANT_WORDS | NUMERIC_WORDS
_FOLD = str.maketrans({c: c.lower() if c.isalnum() or c == "_" else " " for c in map(chr, range(128))})
PROBE_MAX = PATTERN_WINDOW + 1  # a longer text takes the plain regexes (no big temporaries)

#: ``probe_words``' answer: the folded text and its words found in a vocabulary.
Probe = tuple[str, frozenset[str]]


def probe_words(text: str, vocabulary: frozenset[str]) -> Probe | None:
    """The folded ``text`` and its words (maximal \\w runs, lower-cased) in ``vocabulary``.

    ``vocabulary`` must hold the words of every ``*_match`` function given the probe.
    None for a non-ASCII or very long text: those functions then run the plain regexes.
    """
    if len(text) > PROBE_MAX or not text.isascii():
        return None
    folded = text.translate(_FOLD)
    return folded, vocabulary.intersection(folded.split())


def probed_search(
    pattern: re.Pattern[str],
    text: str,
    probe: Probe | None,
    words: frozenset[str],
    fragments: tuple[str, ...],
) -> bool:
    """``pattern.search(text)`` for a pattern of whole ``words`` or other branches whose
    every match holds, folded, one of ``fragments``; sped up by ``probe``."""
    if probe is None:
        return pattern.search(text) is not None
    folded, found = probe
    if not words.isdisjoint(found):
        return True
    return any(fragment in folded for fragment in fragments) and pattern.search(text) is not None


def system_prompt_match(text: str, probe: Probe | None) -> bool:
    """``SYSTEM_PROMPT_RE.search(text)``, sped up by ``probe`` (from ``probe_words(text)``)."""
    return probed_search(SYSTEM_PROMPT_RE, text, probe, SYSTEM_WORDS, ("you are", "your role"))


def code_match(text: str, probe: Probe | None) -> bool:
    """``CODE_RE.search(text)``, sped up by ``probe``."""
    if probe is None:
        return CODE_RE.search(text) is not None
    if "```" in text or not CODE_WORDS.isdisjoint(probe[1]):
        return True
    return ("+" in text or "#" in text) and CODE_RE.search(text) is not None  # c++, c#


def important_match(text: str, probe: Probe | None) -> bool:
    """``IMPORTANT_RE.search(text)``, sped up by ``probe``."""
    if probe is None:
        return IMPORTANT_RE.search(text) is not None
    return not IMPORTANT_WORDS.isdisjoint(probe[1])


def numeric_match(text: str, probe: Probe | None) -> bool:
    """``NUMERIC_RE.search(text)``, sped up by ``probe``."""
    if probe is None:
        return NUMERIC_RE.search(text) is not None
    folded, found = probe
    if _DIGIT_OR_PERCENT_RE.search(text) is not None or not NUMERIC_WORDS.isdisjoint(found):
        return True
    return "o clock" in folded and NUMERIC_RE.search(text) is not None


_PATTERN_CACHE_TEXT = 4096  # longer texts are matched each time (not remembered)


def pattern_matches(text: str) -> list[str]:
    """Names of the importance patterns that match ``text``, in the reference order.

    A text longer than ``PATTERN_WINDOW`` is judged by its first and last halves of
    the window (a 50 MB message scores in milliseconds, not minutes). Results for
    short texts are remembered: a replay scores the same entries turn after turn.
    """
    return list(matched_patterns(text))


def matched_patterns(text: str) -> tuple[str, ...]:
    """``pattern_matches(text)`` as a tuple, memoised for short texts (speed only)."""
    if len(text) <= _PATTERN_CACHE_TEXT:
        return _short_text_patterns(text)
    return tuple(_pattern_matches(text))


# 8192 texts of at most 4096 characters: at most ~32 MB of keys, and more entries than a
# replay's cache and recent snapshots hold at once (the texts scored turn after turn).
@lru_cache(maxsize=8192)
def _short_text_patterns(text: str) -> tuple[str, ...]:
    return tuple(_pattern_matches(text))


def _pattern_matches(text: str) -> list[str]:
    if len(text) > PATTERN_WINDOW:
        half = PATTERN_WINDOW // 2
        text = text[:half] + "\n" + text[-half:]
    probe = probe_words(text, _PATTERN_WORDS)
    found = []
    if system_prompt_match(text, probe):
        found.append("system_prompt")
    if code_match(text, probe):
        found.append("code_block")
    if important_match(text, probe):
        found.append("important_concept")
    if is_question(text):
        found.append("question")
    if numeric_match(text, probe):
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
    """Entry keywords: words over 3 chars, lower-cased, no stop words or repeats in a row."""
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
    """Scores entries with the reference weights; engagement comes from the store."""

    def __init__(self, weights: ScoringWeights | None = None) -> None:
        self.weights = weights or ScoringWeights()

    def key_pattern_score(self, entry: KVEntry) -> float:
        score = 0.0
        if entry.key_type in ATTENTION_TYPES:
            score += 0.1
        elif entry.key_type in FFN_TYPES:
            score += 0.05
        for name in matched_patterns(entry.key_data or ""):
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
    """+0.15 when retrieved, +0.05 otherwise, clamped to [0.1, 1.0]."""
    return max(0.1, min(1.0, current + (0.15 if retrieved else 0.05)))


def decayed_engagement(current: float) -> float:
    """Every key not touched decays x0.95 (floor 0.1)."""
    return max(0.1, current * 0.95)
