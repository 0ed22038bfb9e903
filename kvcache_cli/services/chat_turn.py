"""A live chat turn for ``kvcache serve``, over the manager's turn API.

``begin_turn`` stores the request's new messages and runs the engine over the turn
(``KVCacheManager.begin_turn``, the code ``process`` runs) and returns a
:class:`TurnPlan`: what the engine did and what the model's context should hold.
``finish_turn`` stores the complete reply, ``replace_reply`` a regenerated one,
``branch`` starts an edited conversation's session from the common prefix, and
``force_clear`` clears a session whose prompt would not fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kvcache_cli.config import Config
from kvcache_cli.engine.entries import ChatMessage
from kvcache_cli.engine.memory import TEMPLATE_TOKENS
from kvcache_cli.services import turns
from kvcache_cli.services.manager import KVCacheManager
from kvcache_cli.store import sessions
from kvcache_cli.store.backend import Store

FORCED_CLEAR = "ContextLimit"
FORCED_START_KEY = "forced_context_start"  # in the session's metadata ``serve``: see force_clear


@dataclass
class TurnPlan:
    """What the engine decided for one turn, as plain data.

    ``context_start``: index of the first message the model sees verbatim (0 until the
    first clear; after a clear, the user message of the clearing turn). ``preserved``:
    indexes of earlier messages the clear kept. ``retrieved``: past messages retrieval
    found for this turn as ``(message_index, role, text)``, none already in the context.
    """

    session_key: str
    action: str = "none"  # none | cleared | retrieved | cleared+retrieved
    clear_reason: str | None = None
    summary: str | None = None
    context_start: int = 0
    preserved: list[int] = field(default_factory=list)
    retrieved: list[tuple[int, str, str]] = field(default_factory=list)
    messages_stored: int = 0
    notices: list[str] = field(default_factory=list)


def manager_for(store: Store, config: Config, llm: Any, n_ctx: int | None) -> KVCacheManager:
    """A manager whose capacity is ``n_ctx`` tokens (the upstream's, less the reply)."""
    manager = KVCacheManager(store, config, llm)
    manager.set_server_n_ctx(n_ctx)
    return manager


def begin_turn(
    manager: KVCacheManager,
    session_key: str,
    messages: list[ChatMessage],
    forced_start: int = 0,
    verified: int | None = None,
) -> TurnPlan:
    """Store ``messages`` not yet stored and run the engine over the turn they end.

    ``forced_start``: the context start of a clear made by :func:`force_clear` (it is
    later than the engine's own when the last clear was forced). ``verified``: how many
    of ``messages`` the caller found stored already, under the session's lock (the
    stored history is then not read again). Vectors are left for :func:`add_vectors`
    (after the answer), but for a question retrieval searches with.
    """
    outcome = turns.begin_turn(manager, session_key, messages, verified, defer_vectors=True)
    plan = TurnPlan(
        session_key=session_key, messages_stored=outcome.messages_stored, notices=list(outcome.notices)
    )
    if outcome.clear is not None:
        plan.action, plan.clear_reason = "cleared", outcome.clear.reason
    start = max(outcome.context_start, forced_start)
    _fill_context(plan, start, outcome.summary, outcome.active)
    held = set(plan.preserved)
    last = len(messages) - 1
    for entry in outcome.retrieved:
        index = entry.message_index
        if (
            entry.session_id != session_key
            or index is None
            or index >= start
            or index in held
            or index >= last
        ):
            continue
        held.add(index)
        plan.retrieved.append((index, entry.role or "user", entry.text))
    if plan.retrieved:
        plan.action = "retrieved" if plan.action == "none" else plan.action + "+retrieved"
    return plan


def _fill_context(plan: TurnPlan, start: int, summary: str | None, active: list[Any]) -> None:
    plan.context_start = start
    if start <= 0:
        return
    plan.summary = summary
    plan.preserved = sorted(
        {e.message_index for e in active if e.message_index is not None and e.message_index < start}
    )


def force_clear(manager: KVCacheManager, session_key: str, user_index: int, plan: TurnPlan) -> TurnPlan:
    """Clear the session now (its prompt would not fit the upstream) and restart its
    context at ``user_index``, the turn's user message; returns the new plan."""
    info = manager.clear(session_key, reason=FORCED_CLEAR)
    outcome = manager.begin_turn(session_key, [])  # nothing new: the state after the clear
    new = TurnPlan(session_key=session_key, messages_stored=plan.messages_stored, notices=plan.notices)
    new.action, new.clear_reason = "cleared", info.reason
    _fill_context(new, user_index, outcome.summary, outcome.active)
    new.retrieved = plan.retrieved
    if new.retrieved:
        new.action += "+retrieved"
    return new


def finish_turn(
    manager: KVCacheManager,
    session_key: str,
    reply: ChatMessage,
    facts: dict[str, Any] | None = None,
    generated: int | None = None,
) -> int:
    """Store the complete reply after the stored history, and ``facts`` as
    :func:`record_live` does, in one transaction; returns messages stored.

    ``generated``: the tokens the model generated for the reply's text (the answer's
    ``usage.completion_tokens``): its count without asking ``/tokenize``."""
    update = partial(_merge_live, facts=facts) if facts else None
    known = [generated + TEMPLATE_TOKENS] if generated is not None else None
    return turns.finish_turn(
        manager, session_key, [reply], defer_vectors=True, update=update, known_tokens=known
    )


def replace_reply(
    manager: KVCacheManager,
    session_key: str,
    reply: ChatMessage,
    facts: dict[str, Any] | None = None,
    generated: int | None = None,
) -> int:
    """Regenerate: the new reply replaces the stored one (``facts`` and ``generated``:
    see :func:`finish_turn`); returns messages dropped."""
    update = partial(_merge_live, facts=facts) if facts else None
    known = [generated + TEMPLATE_TOKENS] if generated is not None else None
    return turns.replace_reply(
        manager, session_key, [reply], defer_vectors=True, update=update, known_tokens=known
    )


def add_vectors(manager: KVCacheManager, session_key: str) -> int:
    """Embed and store the vectors the session's messages lack (the turn's question and
    reply: left for after the answer); the vectors stored."""
    return turns.store_missing_vectors(manager, session_key)


def branch(manager: KVCacheManager, source_key: str, new_key: str, common: int) -> None:
    """An edited conversation: ``new_key`` starts as the first ``common`` stored
    messages of ``source_key`` (replayed as ``process`` would)."""
    manager.branch_session(source_key, new_key, common)


def forced_start(metadata: str | None) -> int:
    """Where the context restarts after the session's last forced clear (0: none), from
    the session's ``metadata``.

    A clear made by :func:`force_clear` is not a turn's decision, so the engine's own
    ``context_start`` does not know it; it is kept in the session's metadata."""
    value = json.loads(metadata or "{}").get("serve", {}).get(FORCED_START_KEY, 0)
    return int(value) if isinstance(value, int) else 0


def record_live(store: Store, session_key: str, facts: dict[str, Any]) -> None:
    """Merge ``facts`` into the session's metadata under ``serve`` (one transaction):
    what ``kvcache stats`` shows of a session served live (slot, prompt tokens, n_ctx)."""

    def work() -> None:
        row = sessions.find(store, session_key, for_update=True)
        if row is None:
            return
        _merge_live(row, facts)
        sessions.save(store, row)

    store.transaction(work)


def _merge_live(row: Any, facts: dict[str, Any]) -> None:
    """Merge ``facts`` into a session row's metadata under ``serve`` (not saved)."""
    meta = json.loads(row.metadata or "{}")
    meta["serve"] = {**meta.get("serve", {}), **facts}
    row.metadata = json.dumps(meta, sort_keys=True)
