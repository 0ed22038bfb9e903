"""The cumulative summary a clear writes: asked of the LLM before the write transaction,
else written extractively (``engine.summary``) inside it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from kvcache_cli.engine.entries import ChatMessage
from kvcache_cli.engine.summary import MIN_MESSAGES, TAIL_MESSAGES, extractive_summary
from kvcache_cli.engine.turn import clear_reason
from kvcache_cli.errors import ServerError
from kvcache_cli.services.core import Core
from kvcache_cli.store import cache, sessions
from kvcache_cli.store import models as m


def _tail(core: Core, session_id: int, since: int, below: int | None = None) -> list[ChatMessage]:
    rows = sessions.tail(core.store, session_id, since, TAIL_MESSAGES, below)
    return [ChatMessage(role=role, content=content, name=name) for role, content, name in rows]


def _ask_llm(core: Core, prior: str | None, messages: list[ChatMessage]) -> str | None:
    """The LLM's summary, or None with a notice when the server fails."""
    from kvcache_cli.llm.summarize import summarize

    if core.chat_llm is None:
        return None
    try:
        return summarize(core.chat_llm, prior, [msg.to_dict() for msg in messages])
    except ServerError as exc:
        core.llm_down = core.llm_down or str(exc).startswith("cannot connect")
        core.notice(f"summary: {exc}; used the extractive summary instead")
        return None


def prepare_for_turn(
    core: Core,
    stored: Callable[[], m.Session | None],
    session_key: str,
    msgs: list[ChatMessage],
    tokens: list[int],
    seen: int | None = None,
) -> None:
    """Before a turn's transaction: when the turn looks set to clear, get the LLM summary now.

    Predicts the turn's clear from the stored session (``stored()``: its row, None when
    not stored): turn count, cache size plus the turn's new messages, so the chat
    request runs outside the write lock. ``seen``: the index of the turn's first message
    (the stored messages before it are what the turn sees; an imported session also
    stores later ones); None: every stored message.
    """
    core.ready_summary = None
    if core.chat_llm is None or core.server_down():
        return
    user_pos = next((i for i, msg in enumerate(msgs) if msg.role == "user"), None)
    if user_pos is None:
        return
    session = stored()
    count = (session.conversation_count if session else 0) + 1
    usage = (session.cache_size_bytes if session else 0) + sum(
        tokens[: user_pos + 1]
    ) * core.config.model.bytes_per_token
    if clear_reason(count, usage, core.capacity(), core.config.cache) is not None:
        prepare(core, session_key, msgs[: user_pos + 1], seen)


def prepare(core: Core, session_key: str, new_msgs: list[ChatMessage], seen: int | None = None) -> None:
    """Ask the LLM for the summary of the coming clear now, outside the write transaction.

    ``write`` uses it only if the session is still in the state it was made for (else,
    after a race with another writer, it asks inside as before). ``seen``: see
    ``prepare_for_turn``.
    """
    core.ready_summary = None
    if core.chat_llm is None or core.server_down():
        return
    session = sessions.find(core.store, session_key)
    existing = cache.summary(core.store, session.get_id()) if session is not None else None
    since = existing.messages_summarized if existing else 0
    before = seen
    if before is None:
        before = sessions.count_messages(core.store, session.get_id()) if session is not None else 0
    total = before + len(new_msgs)
    stored = _tail(core, session.get_id(), since, before) if session is not None else []
    prior = existing.text if existing else None
    messages = (stored + new_msgs)[-TAIL_MESSAGES:]
    if len(messages) < MIN_MESSAGES:
        return
    text = _ask_llm(core, prior, messages)
    core.ready_summary = ((since, total, prior), text)


def write(
    core: Core, session: m.Session, now: datetime, upto: int | None = None
) -> tuple[str | None, str | None]:
    """Update the session's cumulative summary (in the clear's transaction); (text, source).

    ``upto``: summarise the messages before this index (a turn's: through its question;
    an imported session stores later ones too); None: every stored message.
    """
    sid = session.get_id()
    existing = cache.summary(core.store, sid)
    since = existing.messages_summarized if existing else 0
    total = sessions.count_messages(core.store, sid) if upto is None else upto
    messages = _tail(core, sid, since, upto)
    if len(messages) < MIN_MESSAGES:
        return (existing.text, existing.source) if existing else (None, None)
    prior = existing.text if existing else None
    text: str | None = None
    source = "extractive"
    ready: Any
    ready, core.ready_summary = core.ready_summary, None
    if ready is not None and ready[0] == (since, total, prior):
        text = ready[1]  # asked before the transaction (None: it failed, notice given)
        source = "llm" if text else "extractive"
    elif core.chat_llm is not None and core.server_down():
        core.notice("summary: the LLM server is unreachable; used the extractive summary instead")
    elif core.chat_llm is not None:
        text = _ask_llm(core, prior, messages)
        source = "llm" if text else "extractive"
    if not text:
        text = extractive_summary(prior, messages)
        source = "extractive"
    if not text:
        return (prior, existing.source if existing else None)
    cache.write_summary(core.store, sid, text, max(1, len(text) // 4), total, source, now)
    return text, source
