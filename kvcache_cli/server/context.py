"""The prompt kvcache sends upstream, built from the client's messages and the turn plan.

While the session was never cleared, the client's messages go unchanged. After a
clear: the system messages, the summary bridge, the preserved messages and the messages
since the clear, in that order (a prefix that stays the same until the next clear, so
the server's prompt cache is reused). When retrieval found past messages, they go as
one system message just before the last user message. A prompt never exceeds the
capacity: what does not fit is dropped, oldest first, retrieved context first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvcache_cli.engine import bridge
from kvcache_cli.services.chat_turn import TurnPlan

SYSTEM_ROLES = ("system", "developer")
RETRIEVED_HEADER = "[Memory Retrieval] Earlier in this conversation:"
OBSERVED_KEPT = 8  # answered prompts kept to learn the template's cost from


@dataclass
class TokenBudget:
    """Token counts of a prompt: per-message text counts plus the chat template's cost.

    ``per_message``/``fixed`` start pessimistic and are learned from the upstream's
    ``usage.prompt_tokens`` (see :meth:`learn`), so the estimate stays at or above the
    real count for the template in use. Learning needs every text of the prompt counted,
    so the prompts answered are kept (:meth:`observe`) and learned from only when counts
    are next needed: a prompt that :meth:`bound` proves to fit costs no count at all.
    """

    count_texts: Callable[[list[str]], list[int]]
    per_message: int = 12
    fixed: int = 16
    _seen: deque[tuple[list[dict[str, Any]], int]] = field(
        default_factory=lambda: deque(maxlen=OBSERVED_KEPT), repr=False
    )

    def text_of(self, message: dict[str, Any]) -> str:
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        calls = message.get("tool_calls")
        return str(calls) if calls else ""

    def counts(self, messages: list[dict[str, Any]]) -> list[int]:
        self.settle()
        texts = [self.text_of(m) for m in messages]
        return [n + self.per_message for n in self.count_texts(texts)]

    def total(self, messages: list[dict[str, Any]]) -> int:
        return sum(self.counts(messages)) + self.fixed

    def bound(self, messages: list[dict[str, Any]]) -> int:
        """An upper bound of :meth:`total` without asking the upstream: a token covers at
        least one byte of text (byte-level BPE; SentencePiece with byte fallback adds at
        most its word-start marker: one more per text)."""
        texts = [self.text_of(m) for m in messages]
        return sum(len(t.encode("utf-8", "surrogatepass")) + 1 + self.per_message for t in texts) + self.fixed

    def observe(self, messages: list[dict[str, Any]], prompt_tokens: int) -> None:
        """A prompt the upstream answered, ``prompt_tokens`` long: learned from later."""
        self._seen.append((list(messages), prompt_tokens))

    def settle(self) -> None:
        """Learn from the prompts observed since the last counts (oldest first)."""
        while True:
            try:
                messages, prompt_tokens = self._seen.popleft()
            except IndexError:
                return
            self.learn(messages, prompt_tokens)

    def learn(self, messages: list[dict[str, Any]], prompt_tokens: int) -> None:
        """Tighten the template cost from a prompt whose real size the upstream reported
        (never below it: the per-message cost is rounded up)."""
        if not messages or prompt_tokens <= 0:
            return
        texts = sum(self.count_texts([self.text_of(m) for m in messages]))
        overhead = prompt_tokens - texts - self.fixed
        needed = max(1, -(-overhead // len(messages)))
        if needed > self.per_message:
            self.per_message = needed  # the estimate was short: grow at once
        elif needed < self.per_message and len(messages) >= 4:
            self.per_message = needed + 1  # keep one token per message of margin


@dataclass
class Prompt:
    messages: list[dict[str, Any]]
    tokens: int  # estimated (see TokenBudget)
    dropped: int = 0  # messages left out to fit


def build_prompt(messages: list[dict[str, Any]], plan: TurnPlan) -> list[dict[str, Any]]:
    """The messages to send for ``plan``, before any fitting."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
    start = min(plan.context_start, last_user)
    if start <= 0 and not plan.retrieved:
        return list(messages)
    out: list[dict[str, Any]] = []
    if start > 0:
        out += [m for m in messages[:start] if m.get("role") in SYSTEM_ROLES]
        if plan.summary:
            out.append({"role": "system", "content": bridge.summary_now(plan.summary)})
        out += [
            messages[i] for i in plan.preserved if i < start and messages[i].get("role") not in SYSTEM_ROLES
        ]
    out += messages[start:last_user]
    if plan.retrieved:
        lines = [RETRIEVED_HEADER] + [
            f"({role}, message {index}) {text}" for index, role, text in plan.retrieved
        ]
        out.append({"role": "system", "content": "\n".join(lines)})
    out += messages[last_user:]
    return out


def fit_prompt(prompt: list[dict[str, Any]], budget: TokenBudget, capacity: int) -> Prompt:
    """Drop messages until ``prompt`` fits ``capacity``: the retrieved-context message
    first (line by line, last line first), then the oldest non-system messages before
    the last user message. System messages and the last user message always stay;
    when even they do not fit, the result is over ``capacity`` (the caller refuses it)."""
    msgs = list(prompt)
    counts = budget.counts(msgs)
    total = sum(counts) + budget.fixed
    dropped = 0
    last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=len(msgs) - 1)
    while total > capacity:
        retrieved = next(
            (i for i, m in enumerate(msgs) if str(m.get("content", "")).startswith(RETRIEVED_HEADER)), None
        )
        if retrieved is not None:
            lines = str(msgs[retrieved]["content"]).split("\n")
            if len(lines) > 2:
                msgs[retrieved] = {"role": "system", "content": "\n".join(lines[:-1])}
                counts[retrieved] = budget.counts([msgs[retrieved]])[0]
            else:
                del msgs[retrieved], counts[retrieved]
                last_user -= 1
                dropped += 1
        else:
            victim = next(
                (i for i in range(last_user) if msgs[i].get("role") not in SYSTEM_ROLES),
                None,
            )
            if victim is None:
                break
            del msgs[victim], counts[victim]
            last_user -= 1
            dropped += 1
        total = sum(counts) + budget.fixed
    return Prompt(messages=msgs, tokens=total, dropped=dropped)


def upstream_prompt_count(usage: Any, timings: Any) -> int | None:
    """The prompt's size as the upstream counted it: ``usage.prompt_tokens``, else (a
    llama-server stream ends with ``timings`` and no ``usage``) ``prompt_n + cache_n``."""
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        return int(usage["prompt_tokens"])
    if isinstance(timings, dict) and isinstance(timings.get("prompt_n"), int):
        return int(timings["prompt_n"]) + int(timings.get("cache_n") or 0) or None
    return None
