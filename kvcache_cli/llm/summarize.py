"""The cumulative summary written before a cache clear, asked of an LLM server.

The prompt folds the prior summary in and sends the latest messages; the answer is the
new summary. Callers fall back to the extractive summary when the server fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvcache_cli.errors import ServerError
from kvcache_cli.llm.client import LLMClient

__all__ = ["SUMMARY_MIN_MESSAGES", "SUMMARY_TAIL_MESSAGES", "build_summary_messages", "summarize"]

SUMMARY_TAIL_MESSAGES = 40
"""At most this many of the latest messages to the summarizer."""

SUMMARY_MIN_MESSAGES = 4
"""Fewer messages than this are not summarized."""


_SYSTEM_PROMPT_FIRST = (
    "You are a concise summarizer. Summarize the following conversation "
    "into key facts, decisions, code snippets, and figures. "
    "Be brief — target under 300 tokens. No commentary."
)
_SYSTEM_PROMPT_UPDATE = (
    "You are a concise summarizer. You will be given a running summary of a "
    "conversation followed by new messages that have occurred since that summary. "
    "Produce a single updated summary that covers EVERYTHING — the prior summary "
    "and the new messages combined. Be brief (target under 400 tokens). "
    "Include key facts, decisions, code, numbers, and names. No commentary.\n\n"
    "PRIOR SUMMARY (covers everything before these new messages):\n{prior}"
)
_USER_PROMPT_FIRST = "Please summarize the above conversation now."
_USER_PROMPT_UPDATE = (
    "Please produce the updated cumulative summary now, covering both the prior "
    "summary and these new messages."
)


def build_summary_messages(
    prior_summary: str | None, messages: Sequence[Mapping[str, Any]]
) -> list[dict[str, str]]:
    """The summarization prompt: system text, the last 40 messages, the request."""
    has_prior = prior_summary is not None and prior_summary.strip() != ""
    if has_prior:
        system = _SYSTEM_PROMPT_UPDATE.format(prior=prior_summary)
        user = _USER_PROMPT_UPDATE
    else:
        system = _SYSTEM_PROMPT_FIRST
        user = _USER_PROMPT_FIRST
    tail = list(messages)[-SUMMARY_TAIL_MESSAGES:]
    out = [{"role": "system", "content": system}]
    for m in tail:  # servers' chat templates may not know OpenAI's newer "developer" role
        role = "system" if m["role"] == "developer" else str(m["role"])
        out.append({"role": role, "content": str(m["content"])})
    out.append({"role": "user", "content": user})
    return out


def summarize(
    client: LLMClient,
    prior_summary: str | None,
    messages: Sequence[Mapping[str, Any]],
) -> str | None:
    """Produce the cumulative summary written before a cache clear.

    Returns None for fewer than 4 messages (nothing worth summarizing); raises
    ServerError when the server fails or answers with an empty text. A blank
    ``prior_summary`` counts as none.
    """
    if len(messages) < SUMMARY_MIN_MESSAGES:
        return None
    prompt = build_summary_messages(prior_summary, messages)
    text = client.chat(prompt, max_tokens=client.settings.summary_max_tokens)
    text = text.strip()
    if not text:
        label = client._server_label(client._require_base())
        raise ServerError(f"{label}: POST /v1/chat/completions gave an empty summary")
    return text
