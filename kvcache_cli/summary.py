"""Cumulative summaries written before each clear.

With an LLM server the seed's prompt is used (``llm.summarize``). Without one, or when
the server fails, the extractive summarizer keeps what a later turn needs most: names,
numbers, decisions and code. It is cumulative: the prior summary's bullets are kept
(oldest dropped first when over budget) and bullets from the new messages appended.
"""

from __future__ import annotations

import re

from .entries import ChatMessage
from .scoring import CODE_RE, NUMERIC_RE

MIN_MESSAGES = 4
TAIL_MESSAGES = 40
BUDGET_CHARS = 2400
NEW_BULLETS = 8
HEADER = "Summary (extractive) of the conversation so far:"

_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+|\n+")
_NAME_RE = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]{2,}\b")
_DECISION_RE = re.compile(
    r"\b(decid\w*|agree\w*|will|plan\w*|chose|choose|going to|let's|use|switch\w*|"
    r"fix\w*|deadline|remember|prefer\w*|need\w*|must)\b",
    re.I,
)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_RE.split(text) if s and len(s.strip()) > 3]


def sentence_score(sentence: str) -> float:
    """How much a sentence carries: names, numbers, decisions, code."""
    score = 0.0
    score += min(3, len(_NAME_RE.findall(sentence))) * 1.0
    if NUMERIC_RE.search(sentence):
        score += 1.5
    if _DECISION_RE.search(sentence):
        score += 1.0
    if CODE_RE.search(sentence):
        score += 1.5
    if sentence.rstrip().endswith("?"):
        score -= 0.5
    return score + min(len(sentence), 200) / 400.0


def _bullet(role: str, sentence: str) -> str:
    text = " ".join(sentence.split())
    if len(text) > 220:
        text = text[:217] + "..."
    return f"- {role}: {text}"


def _code_bullets(message: ChatMessage) -> list[str]:
    blocks = re.findall(r"```[^\n]*\n(.*?)```", message.content, re.S)
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
        if message.role == "system":
            continue
        for bullet in _code_bullets(message):
            candidates.append((5.0, order, bullet))
            order += 1
        for sentence in _sentences(re.sub(r"```.*?```", " ", message.content, flags=re.S)):
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
