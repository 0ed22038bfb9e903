"""Cumulative summaries written before each clear.

With an LLM server the reference summarization prompt is used (``llm.summarize``). Without one, or when
the server fails, the extractive summarizer keeps what a later turn needs most: names,
numbers, decisions and code. It is cumulative: the prior summary's bullets are kept
(oldest dropped first when over budget) and bullets from the new messages appended.
"""

from __future__ import annotations

import re

from kvcache_cli.engine.entries import SYSTEM_ROLES, ChatMessage
from kvcache_cli.engine.scoring import (
    CODE_WORDS,
    NUMERIC_WORDS,
    Probe,
    code_match,
    numeric_match,
    probe_words,
    probed_search,
)

MIN_MESSAGES = 4
TAIL_MESSAGES = 40
BUDGET_CHARS = 2400
NEW_BULLETS = 8
HEADER = "Summary (extractive) of the conversation so far:"

# The reference r"(?<=[.!?])\s+|\n+" and r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]{2,}\b", rewritten to
# start with a character class, which re scans for fast; each matches the same text at every
# position as the reference ones. Split: a whitespace run after [.!?], else a run of "\n". Name: a
# capital right after a non-word char (\b, not at the start), not after [.!?] + whitespace.
_SENTENCE_RE = re.compile(r"\s(?:(?<=[.!?]\s)\s*|(?<=\n)\n*)")
_NAME_RE = re.compile(r"[A-Z](?<=\W[A-Z])(?<![.!?]\s[A-Z])[a-z]{2,}\b")
_DECISION_RE = re.compile(
    r"\b(decid\w*|agree\w*|will|plan\w*|chose|choose|going to|let's|use|switch\w*|"
    r"fix\w*|deadline|remember|prefer\w*|need\w*|must)\b",
    re.I,
)
# _DECISION_RE's whole words (see ``scoring.probe_words`` for the fast path).
_DECISION_WORDS = frozenset("will chose choose use deadline remember must".split())
_SENTENCE_WORDS = _DECISION_WORDS | NUMERIC_WORDS | CODE_WORDS
_CODE_BLOCK_RE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
_CODE_SPAN_RE = re.compile(r"```.*?```", re.S)

# sentence -> sentence_score(sentence): a cache that changes speed only, never results.
_SCORE_CACHE: dict[str, float] = {}
_SCORE_CACHE_MAX = 50_000
_SCORE_CACHE_TEXT = 1024  # longer sentences are not remembered: at most ~50 MB


def _sentences(text: str) -> list[str]:
    stripped = (s.strip() for s in _SENTENCE_RE.split(text) if s)
    return [s for s in stripped if len(s) > 3]


#: What each match of _DECISION_RE's non-word branches holds, folded.
_DECISION_FRAGMENTS = ("decid", "agree", "plan", "switch", "fix", "prefer", "need", "going to", "let s")


def _decision_match(sentence: str, probe: Probe | None) -> bool:
    """``_DECISION_RE.search(sentence)``, sped up by ``probe`` (``scoring.probe_words``)."""
    return probed_search(_DECISION_RE, sentence, probe, _DECISION_WORDS, _DECISION_FRAGMENTS)


def sentence_score(sentence: str) -> float:
    """How much a sentence carries: names, numbers, decisions, code."""
    cacheable = len(sentence) <= _SCORE_CACHE_TEXT
    if cacheable:
        cached = _SCORE_CACHE.get(sentence)
        if cached is not None:
            return cached
    probe = probe_words(sentence, _SENTENCE_WORDS)
    score = 0.0
    score += min(3, len(_NAME_RE.findall(sentence))) * 1.0
    if numeric_match(sentence, probe):
        score += 1.5
    if _decision_match(sentence, probe):
        score += 1.0
    if code_match(sentence, probe):
        score += 1.5
    if sentence.rstrip().endswith("?"):
        score -= 0.5
    score += min(len(sentence), 200) / 400.0
    if cacheable:
        if len(_SCORE_CACHE) >= _SCORE_CACHE_MAX:
            _SCORE_CACHE.clear()
        _SCORE_CACHE[sentence] = score
    return score


def _bullet(role: str, sentence: str) -> str:
    text = " ".join(sentence.split())
    if len(text) > 220:
        text = text[:217] + "..."
    return f"- {role}: {text}"


def _code_bullets(message: ChatMessage) -> list[str]:
    blocks = _CODE_BLOCK_RE.findall(message.content)
    out = []
    for block in blocks[:1]:
        lines = [ln for ln in block.strip().splitlines() if ln.strip()][:3]
        if lines:
            out.append(f"- {message.role} code: " + " | ".join(ln.strip() for ln in lines))
    return out


def extractive_summary(prior: str | None, messages: list[ChatMessage]) -> str | None:
    """The cumulative extractive summary of ``messages`` on top of ``prior``."""
    if len(messages) < MIN_MESSAGES and not prior:
        return None
    candidates: list[tuple[float, int, str]] = []
    order = 0
    for message in messages[-TAIL_MESSAGES:]:
        if message.role in SYSTEM_ROLES:
            continue
        for bullet in _code_bullets(message):
            candidates.append((5.0, order, bullet))
            order += 1
        for sentence in _sentences(_CODE_SPAN_RE.sub(" ", message.content)):
            candidates.append((sentence_score(sentence), order, _bullet(message.role, sentence)))
            order += 1
    best = sorted(candidates, key=lambda c: (-c[0], c[1]))[:NEW_BULLETS]
    new_bullets = [text for _, _, text in sorted(best, key=lambda c: c[1])]
    old_bullets = [ln for ln in (prior or "").splitlines() if ln.startswith("- ")]
    seen: set[str] = set()
    bullets = []
    for line in old_bullets + new_bullets:
        if line not in seen:
            seen.add(line)
            bullets.append(line)
    while bullets and sum(len(b) + 1 for b in bullets) > BUDGET_CHARS:
        bullets.pop(0)
    if not bullets:
        return None
    return "\n".join([HEADER, *bullets])
