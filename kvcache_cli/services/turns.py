"""Turns: what ``process`` replays and ``kvcache serve`` runs live, through one code path.

A turn is a user message and the replies after it. Each turn is one transaction:
store the messages through the question, decide (clear, snapshot, retrieve: the
engine's rules in ``engine.turn``), store the reply. The network calls a turn needs
(token counts, the summary of a coming clear, embeddings) run before it.

``replay`` is ``process``; ``begin_turn``/``finish_turn`` split a live turn at the
model's answer; ``replace_reply`` (regenerate) and ``branch_session`` (edit) serve
a client that rewrites history.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

from kvcache_cli.engine import bridge
from kvcache_cli.engine.entries import ChatMessage, KVEntry, stored_prefix
from kvcache_cli.engine.turn import clear_reason, file_entries, message_entries, should_retrieve, split_turns
from kvcache_cli.errors import BadInputError
from kvcache_cli.loaders import Conversation
from kvcache_cli.retrieval.fusion import RetrievalResult
from kvcache_cli.services import cache_ops, imported_replay, retrieve, summaries
from kvcache_cli.services.core import Core
from kvcache_cli.services.results import ProcessResult, TurnOutcome, TurnReport
from kvcache_cli.store import cache, search, sessions
from kvcache_cli.store import models as m
from kvcache_cli.store.migrations import utcnow

PROCESS_TIERS = (1, 2, 3)
MAX_QUERY_CHARS = 4000  # a turn's retrieval queries with at most this much of a question


# ----------------------------------------------------------------------------- replay
def check_prefix(
    core: Core, session_key: str, messages: list[ChatMessage], label: str, verified: int | None = None
) -> int:
    """How many of ``messages`` are stored already; refuse a history that diverges.

    ``verified``: that count, when the caller compared them with the store itself (under
    the session's lock, as ``kvcache serve`` does): the stored history is not read again.
    """
    if not core.store.is_sqlite:  # PostgreSQL text cannot hold NUL: refuse before any write
        if "\x00" in session_key:
            raise BadInputError(
                f"{label}: session id contains a NUL character, which PostgreSQL cannot store"
            )
        for index, msg in enumerate(messages):
            if "\x00" in msg.content or "\x00" in (msg.name or "") or "\x00" in msg.role:
                raise BadInputError(
                    f"{label}: message {index} contains a NUL character (\\u0000), "
                    "which PostgreSQL cannot store"
                )
    if not messages:  # nothing to compare (``finish_turn`` checks the key only)
        return 0
    if verified is not None:
        return verified
    session = sessions.find(core.store, session_key)
    if session is None:
        return 0
    return stored_prefix(sessions.history(core.store, session.get_id()), messages, label, session_key)


def process_conversation(
    core: Core, conv: Conversation, session_key: str, on_turn: Callable[[int, int], None] | None = None
) -> ProcessResult:
    """Replay a conversation turn by turn; already stored turns are skipped."""
    result = ProcessResult(session_id=session_key, source=conv.place.rstrip(": "))
    replay(core, conv, session_key, result, on_turn)
    return result


def replay(
    core: Core,
    conv: Conversation,
    session_key: str,
    result: ProcessResult,
    on_turn: Callable[[int, int], None] | None = None,
    known_tokens: list[int] | None = None,
    outcome_of_last: bool = False,
    verified: int | None = None,
    defer_vectors: bool = False,
) -> TurnOutcome | None:
    """Store and decide every turn of ``conv`` not stored yet, one transaction each.

    ``known_tokens``: the messages' token counts when already known (no counting).
    ``outcome_of_last``: read the full ``TurnOutcome`` of the last turn (``begin_turn``);
    otherwise only the reports are collected into ``result``.
    ``verified``: see ``check_prefix``.
    ``defer_vectors``: embed only a question that retrieval will search with; the other
    messages are stored without vectors, for :func:`store_missing_vectors` to add later.
    """
    result.messages_total = len(conv.messages)
    result.capacity_bytes = core.capacity()
    done = check_prefix(core, session_key, conv.messages, result.source or session_key, verified)
    if not core.store.is_sqlite and any(
        isinstance(v, str) and "\x00" in v for entry in conv.kv_entries for v in entry.values()
    ):
        raise BadInputError(
            f"{result.source or session_key}: kv_entries contain a NUL character, "
            "which PostgreSQL cannot store"
        )
    # messages ``import`` stored are run through the engine and stored once (imported_replay)
    stored_session = sessions.find(core.store, session_key)  # also the first turn's prediction
    rerun = imported_replay.rerun_from(core, stored_session, session_key, done, len(conv.messages))
    stored_before = done
    if rerun is not None:
        done = rerun
    pending = [(lo, hi) for lo, hi in split_turns(conv.messages) if hi > done]
    if defer_vectors:
        embedder = None
        if core.embedder is not None:
            core.embedder.vectors.clear()  # none of an earlier turn is stored by this one
    else:
        embedder = start_embeddings(core, session_key)  # also embeds stored messages lacking vectors
    outcome: TurnOutcome | None = None
    for number, (lo, hi) in enumerate(pending, start=1):
        new = conv.messages[max(lo, done) : hi]
        if known_tokens is not None:
            tokens = known_tokens[max(lo, done) : hi]
        else:
            tokens = core.tokens.count([msg.content for msg in new])
        if defer_vectors:
            _prefetch_question(core, session_key, conv.messages, max(lo, done), hi)
        elif embedder is not None and not core.server_down():  # HTTP before the turn's transaction
            embedder.prefetch(conv.messages, max(lo, done), hi)
        # the first turn's prediction uses the row read above; a later one reads it again
        stored: Callable[[], m.Session | None] = (
            (lambda: stored_session) if number == 1 else partial(sessions.find, core.store, session_key)
        )
        summaries.prepare_for_turn(core, stored, session_key, new, tokens, max(lo, done))
        full = outcome_of_last and number == len(pending)
        work = partial(_turn, core, conv, session_key, lo, hi, tokens, result, full)
        outcome = core.store.transaction(work, core.forget_replay_state)
        if outcome is not None and outcome.report is not None:
            result.turns.append(outcome.report)
        if on_turn is not None:
            on_turn(number, len(pending))
    if rerun is not None and pending:  # imported_replay: stored once, by the import
        core.notice(
            f"ran the engine over {stored_before - rerun} messages that import had stored (not stored twice)"
        )
    core.server_down()  # records a token-count failure as a notice
    result.notices.extend(core.notices)
    core.notices.clear()
    return outcome


def _prefetch_question(core: Core, session_key: str, messages: list[ChatMessage], lo: int, hi: int) -> None:
    """Embed the question of turn ``lo..hi`` when retrieval will search with it (its
    semantic tier needs the vector inside the turn's transaction)."""
    question = next((i for i in range(lo, hi) if messages[i].role == "user"), None)
    if question is None or not core.config.cache.retrieval_enabled:
        return
    if not should_retrieve(messages[question].content):
        return
    embedder = start_embeddings(core, session_key, backfill=False)
    if embedder is not None and not core.server_down():
        embedder.prefetch(messages, question, question + 1)


def store_missing_vectors(core: Core, session_key: str) -> int:
    """Embed and store the vectors the session's stored messages lack (HTTP outside the
    transactions); the vectors stored. What a live turn left for after its answer."""
    embedder = start_embeddings(core, session_key, backfill=False)
    if embedder is None:
        return 0
    session = sessions.find(core.store, session_key)
    if session is None:
        return 0
    from kvcache_cli.retrieval.embeddings import backfill_session

    stored = backfill_session(embedder, session.get_id(), utcnow())
    core.server_down()
    return stored


def start_embeddings(core: Core, session_key: str, backfill: bool = True) -> Any:
    """The run's embedder when ``generate_cache_embeddings`` and a server are on.

    With ``backfill``, also embeds the session's already stored messages that lack a
    vector (HTTP outside any transaction). See ``embeddings`` for the model/dimension policy.
    """
    if core.llm is None or not core.config.cache.generate_cache_embeddings or core.server_down():
        return None
    from kvcache_cli.retrieval.embeddings import TurnEmbedder, backfill_session

    if core.embedder is None:
        core.embedder = TurnEmbedder(core.llm, core.store, core.notices)
    core.embedder.vectors.clear()
    session = sessions.find(core.store, session_key) if backfill and not core.embedder.failed else None
    if session is not None:
        backfill_session(core.embedder, session.get_id(), utcnow())
    return core.embedder if not core.embedder.failed else None


def _turn(
    core: Core,
    conv: Conversation,
    session_key: str,
    lo: int,
    hi: int,
    tokens: list[int],
    result: ProcessResult,
    full_outcome: bool = False,
) -> TurnOutcome | None:
    """One turn in one transaction: store, decide, clear, snapshot, retrieve, store the reply.

    On messages ``import`` stored, the turn runs over them without storing them again
    (``imported_replay``).
    """
    wall = utcnow()
    session = core.session_for_update(session_key, create=True, now=wall)
    stored = sessions.stored_count(core.store, session.get_id())
    # --- imported replay (F3): the engine runs from the import's mark, over stored messages
    imported = imported_replay.open_turn(core, session, stored)
    ran = stored if imported is None else imported.mark
    if ran >= hi:
        return None  # another process ran this turn meanwhile
    start = max(lo, ran)
    kept = imported.kept(start, hi) if imported is not None else 0  # of msgs, stored already
    # --- end imported replay
    if start != max(lo, hi - len(tokens)):
        # another process stored part of it: recount for what is left
        tokens = core.tokens.count([msg.content for msg in conv.messages[start:hi]])
    msgs = conv.messages[start:hi]
    user_pos = next((i for i, msg in enumerate(msgs) if msg.role == "user"), None)
    question = msgs[user_pos] if user_pos is not None else None
    now = (question.timestamp if question and question.timestamp else None) or wall
    cut = (user_pos + 1) if user_pos is not None else len(msgs)
    before, after = msgs[:cut], msgs[cut:]
    new_entries = _store_messages(core, session, start, before, tokens[:cut], now, min(kept, cut))
    new_entries += _file_entries(core, conv, start, start + cut, now)
    result.messages_added += len(before) - min(kept, cut)
    active = cache.active_entries(core.store, session.get_id())
    cached = {entry.key_hash for entry in active}  # the whole cache, read just now
    cache.add_entries(core.store, session.get_id(), new_entries, len(active), cached)
    active += new_entries
    report: TurnReport | None = None
    found: RetrievalResult | None = None
    if question is not None and user_pos is not None:
        report, found = _decide(core, session, active, start + user_pos, question, now)
    if full_outcome:  # with no clear in this turn, the active cache is the list at hand
        unchanged = active if report is None or report.clear is None else None
        outcome = _outcome(core, session, report, found, unchanged)
    else:
        outcome = TurnOutcome(session_key, report)
    if after:
        _store_reply(core, session, conv, start + cut, after, tokens[cut:], now, max(0, kept - cut))
        result.messages_added += len(after) - max(0, kept - cut)
    if imported is not None:  # imported replay (F3): the mark moves to the turn's end
        ran_users = sum(1 for msg in msgs[:kept] if msg.role == "user")
        imported_replay.close_turn(session, imported, ran_users, hi)
    session.last_activity = wall
    sessions.save(core.store, session)
    return outcome


def _file_entries(core: Core, conv: Conversation | None, lo: int, hi: int, now: datetime) -> list[KVEntry]:
    if conv is None or not conv.kv_entries:
        return []
    return file_entries(
        conv.kv_entries,
        conv.place,
        conv.session_key or "",
        lo,
        hi,
        now,
        core.config.model.bytes_per_token,
        core.scorer,
        core.tokens.count,
    )


def _store_messages(
    core: Core,
    session: m.Session,
    start: int,
    msgs: list[ChatMessage],
    tokens: list[int],
    now: datetime,
    kept: int = 0,
) -> list[KVEntry]:
    """Store messages at ``start``.., index them, store their vectors; their cache entries.

    ``kept``: the first ones are stored already (``imported_replay``): only their token
    counts are set, and their missing vectors stored.
    """
    if not msgs:
        return []
    ids = sessions.rerun_messages(core.store, session.get_id(), start, tokens[:kept]) if kept else []
    rows = [
        (msg.role, msg.name, msg.content, tokens[i], msg.timestamp) for i, msg in enumerate(msgs) if i >= kept
    ]
    if rows:
        added = sessions.insert_messages(core.store, session.get_id(), start + kept, rows)
        if core.index_history:
            search.index_messages(core.store, [(mid, session.id, content) for mid, _, content in added])
        ids += added
    if core.embedder is not None:  # vectors computed before this transaction
        core.embedder.store_for([(mid, index) for mid, index, _ in ids], utcnow())
    per_token = core.config.model.bytes_per_token
    return message_entries(session.key, start, msgs, tokens, now, per_token, core.scorer)


def _store_reply(
    core: Core,
    session: m.Session,
    conv: Conversation | None,
    start: int,
    msgs: list[ChatMessage],
    tokens: list[int],
    now: datetime,
    kept: int = 0,
) -> None:
    """Store the messages after a turn's question and add them to the cache (in a transaction).

    ``kept``: see ``_store_messages``."""
    later = _store_messages(core, session, start, msgs, tokens, now, kept)
    later += _file_entries(core, conv, start, start + len(msgs), now)
    cache.add_entries(core.store, session.get_id(), later, session.entry_count)
    session.cache_size_bytes += sum(e.size_bytes for e in later)
    session.entry_count += len(later)


def _decide(
    core: Core,
    session: m.Session,
    active: list[KVEntry],
    user_index: int,
    question: ChatMessage,
    now: datetime,
) -> tuple[TurnReport, RetrievalResult | None]:
    """The turn ending in ``question``: clear, snapshot, retrieve; the turn log row."""
    cfg = core.config.cache
    capacity = core.capacity()
    usage = sum(e.size_bytes for e in active)
    count = session.conversation_count + 1
    reason = clear_reason(count, usage, capacity, cfg)
    session.conversation_count = count
    session.turn_count += 1
    session.cache_size_bytes = usage
    session.entry_count = len(active)
    session.capacity_bytes = capacity
    report = TurnReport(
        turn=session.turn_count,
        message_index=user_index,
        conversation_count=count,
        cache_size_bytes=usage,
        entry_count=len(active),
    )
    bridges: list[str] = []
    found: RetrievalResult | None = None
    if reason is not None:
        clear = cache_ops.clear_in_turn(
            core, session, active, reason, now, turn=session.turn_count, upto=user_index + 1
        )
        report.clear = clear
        if clear.snapshot_id is not None:
            report.snapshot_ids.append(clear.snapshot_id)
        if cfg.bridge_enabled:
            bridges.append(clear.bridge_message)
        active = [e for e in active if e.key_hash in clear.kept_keys]
    elif session.last_cleared_at is not None and cfg.bridge_enabled:
        text = cache.summary_text(core.store, session.get_id())
        if text is not None:
            bridges.insert(0, bridge.summary_prior(text))
    snap = cache_ops.interval_snapshot(core, session, active, now)
    if snap is not None:
        report.snapshot_ids.append(snap)
    if cfg.retrieval_enabled and should_retrieve(question.content):
        qvec = core.embedder.vector_for(user_index) if core.embedder is not None else None
        found = retrieve.in_session(
            core,
            session,
            question.content[:MAX_QUERY_CHARS],  # a huge message queries by its start
            tiers=PROCESS_TIERS,
            limit=20,
            cascade=True,
            exclude_from=user_index,
            active=active,
            now=now,
            semantic=(qvec, core.embedder.model) if qvec is not None else None,
        )
        report.retrieval_tiers = found.tiers_searched
        report.retrieved = len(found.entries)
        if found.bridge_message and cfg.bridge_enabled:
            bridges.append(found.bridge_message)
    report.bridge_messages = bridges
    cache.log_turn(
        core.store,
        session.get_id(),
        session.turn_count,
        user_index,
        report.cache_size_bytes,
        report.entry_count,
        report.clear.reason if report.clear else None,
        report.retrieved,
    )
    return report, found


# ----------------------------------------------------------------------------- live turns
def _outcome(
    core: Core,
    session: m.Session,
    report: TurnReport | None,
    found: RetrievalResult | None,
    active: list[KVEntry] | None = None,
) -> TurnOutcome:
    """The turn's decision with what a prompt builder needs (inside the transaction);
    ``active``: the session's active cache when the caller holds it (else it is read)."""
    sid = session.get_id()
    return TurnOutcome(
        session_id=session.key,
        report=report,
        retrieved=list(found.entries) if found is not None else [],
        summary=cache.summary_text(core.store, sid),
        active=list(active) if active is not None else cache.active_entries(core.store, sid),
        context_start=cache.last_clear_index(core.store, sid),
    )


def begin_turn(
    core: Core,
    session_key: str,
    messages: list[ChatMessage],
    verified: int | None = None,
    defer_vectors: bool = False,
) -> TurnOutcome:
    """Store a request's new messages and decide its turn.

    ``messages`` is the whole history through the new user message. The stored prefix
    is skipped (a history that diverges from it is a ``BadInputError``); earlier new
    turns are replayed as ``process`` would, each in its own transaction; the last
    one's decision is returned with what the prompt needs. ``verified``: how many of
    ``messages`` the caller found stored already (see ``check_prefix``).
    ``defer_vectors``: see ``replay``.
    """
    conv = Conversation(session_key=session_key, messages=list(messages), place=f"session {session_key}: ")
    result = ProcessResult(session_id=session_key, source=f"session {session_key}")
    outcome = replay(
        core, conv, session_key, result, outcome_of_last=True, verified=verified, defer_vectors=defer_vectors
    )
    if outcome is None:  # nothing new: the state as it stands

        def now_state() -> TurnOutcome:
            session = core.session_for_update(session_key, create=False, now=utcnow())
            return _outcome(core, session, None, None)

        outcome = core.store.transaction(now_state)
    outcome.messages_stored = result.messages_added
    outcome.notices = result.notices
    return outcome


def _reply_tokens(
    core: Core,
    session_key: str,
    reply: list[ChatMessage],
    known_tokens: list[int] | None,
    defer_vectors: bool,
) -> list[int]:
    """A reply's token counts (``known_tokens`` when it has one per message) and,
    unless ``defer_vectors``, its embeddings fetched: the network part, before the
    transaction."""
    if known_tokens is not None and len(known_tokens) == len(reply):
        tokens = list(known_tokens)
    else:
        tokens = core.tokens.count([msg.content for msg in reply])
    if not defer_vectors:
        _prefetch_vectors(core, session_key, reply)
    return tokens


def _append_reply(
    core: Core,
    session: m.Session,
    reply: list[ChatMessage],
    tokens: list[int],
    wall: datetime,
    update: Callable[[m.Session], None] | None,
) -> None:
    """Inside the transaction: ``reply`` after the stored history, then the session row
    (activity time, ``update``) saved."""
    if reply:
        start = sessions.stored_count(core.store, session.get_id())
        _store_reply(core, session, None, start, reply, tokens, reply[0].timestamp or wall)
    session.last_activity = wall
    if update is not None:
        update(session)
    sessions.save(core.store, session)


def finish_turn(
    core: Core,
    session_key: str,
    reply: list[ChatMessage],
    defer_vectors: bool = False,
    update: Callable[[m.Session], None] | None = None,
    known_tokens: list[int] | None = None,
) -> int:
    """Store the turn's reply messages after the stored history (one transaction).

    Returns how many messages were stored. Token counts (unless ``known_tokens``) and
    embeddings are fetched before the transaction (``defer_vectors``: no embeddings,
    see :func:`store_missing_vectors`). ``update`` changes the session row in the same
    transaction (``kvcache serve``: the operator's view in its metadata).
    """
    if not reply:
        return 0
    check_prefix(core, session_key, [], f"session {session_key}")  # NUL check of the key
    tokens = _reply_tokens(core, session_key, reply, known_tokens, defer_vectors)

    def work() -> int:
        wall = utcnow()
        session = core.session_for_update(session_key, create=False, now=wall)
        _append_reply(core, session, reply, tokens, wall, update)
        return len(reply)

    stored = core.store.transaction(work, core.forget_replay_state)
    core.server_down()
    return stored


def replace_reply(
    core: Core,
    session_key: str,
    reply: list[ChatMessage],
    defer_vectors: bool = False,
    update: Callable[[m.Session], None] | None = None,
    known_tokens: list[int] | None = None,
) -> int:
    """Regenerate: drop the stored messages after the last user message, store ``reply``.

    One transaction; the dropped messages leave the history, its full-text index,
    their vectors and the active cache. Returns how many messages were dropped.
    ``defer_vectors``, ``update`` and ``known_tokens``: see :func:`finish_turn`.
    """
    tokens = _reply_tokens(core, session_key, reply, known_tokens, defer_vectors)

    def work() -> int:
        wall = utcnow()
        session = core.session_for_update(session_key, create=False, now=wall)
        sid = session.get_id()
        last_user = sessions.last_user_index(core.store, sid)
        ids = sessions.ids_after(core.store, sid, last_user)
        if ids:
            if core.index_history:
                search.delete_messages(core.store, ids)
            cache.drop_after(core.store, sid, last_user)
            sessions.delete_messages(core.store, ids)
            session.cache_size_bytes, session.entry_count = cache.totals(core.store, sid)
        _append_reply(core, session, reply, tokens, wall, update)
        return len(ids)

    dropped = core.store.transaction(work, core.forget_replay_state)
    core.forget_replay_state()  # the in-memory indexes still hold the dropped messages
    core.server_down()
    return dropped


def branch_session(core: Core, source_key: str, new_key: str, n_messages: int) -> ProcessResult:
    """Edit: a new session replaying the first ``n_messages`` stored messages of another.

    The copy is replayed turn by turn (clears, summaries, snapshots as ``process``
    makes them) with the stored token counts, so no server is asked for counts.
    """
    source = core.session(source_key)
    if sessions.exists(core.store, new_key):
        raise BadInputError(f"session {new_key!r} exists already")
    rows = sessions.first_messages(core.store, source.get_id(), n_messages)
    messages = [
        ChatMessage(role=role, content=content, name=name, timestamp=ts)
        for role, content, name, ts, _ in rows
    ]
    conv = Conversation(session_key=new_key, messages=messages, place=f"session {new_key}: ")
    result = ProcessResult(session_id=new_key, source=f"branch of {source_key}")
    replay(core, conv, new_key, result, known_tokens=[r[4] for r in rows])
    return result


def _prefetch_vectors(core: Core, session_key: str, reply: list[ChatMessage]) -> None:
    """Embed reply messages before their transaction (indexes as they will be stored).

    No backfill here: the turn's ``begin_turn`` just did it (a message still lacking a
    vector is embedded by the session's next turn)."""
    embedder = start_embeddings(core, session_key, backfill=False)
    if embedder is None or core.server_down():
        return
    session = sessions.find(core.store, session_key)
    start = sessions.stored_count(core.store, session.get_id()) if session is not None else 0
    padded: list[ChatMessage] = [ChatMessage(role="user", content="")] * start + list(reply)
    embedder.prefetch(padded, start, len(padded))
