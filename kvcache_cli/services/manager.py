"""The KV-cache manager: the seed's engine, persisted.

Every state the seed kept in memory (session state, statistics, operation history,
engagement) lives in the store, and every turn is one transaction: the turn's
messages, cache entries, clear, snapshot, summary, statistics and operation records
commit together or not at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from kvcache_cli.config import Config
from kvcache_cli.engine import bridge
from kvcache_cli.engine.entries import (
    SYSTEM_ROLES,
    ChatMessage,
    KVEntry,
    entries_hash,
    key_hash_for,
    stored_prefix,
)
from kvcache_cli.engine.extractor import PRESERVE_SHARE, extract_entries, filter_preserved, fit_to_budget
from kvcache_cli.engine.memory import TokenCounter, capacity_bytes
from kvcache_cli.engine.scoring import CacheEntryScorer, next_engagement
from kvcache_cli.engine.summary import MIN_MESSAGES, TAIL_MESSAGES, extractive_summary
from kvcache_cli.errors import BadInputError, IntegrityError, NotFoundError, StoreError
from kvcache_cli.loaders import Conversation
from kvcache_cli.retrieval.fusion import (
    TIER_THRESHOLDS,
    RetrievalResult,
    RetrievedEntry,
    merge_results,
    rank_entries,
)
from kvcache_cli.store import models as m
from kvcache_cli.store import search
from kvcache_cli.store.backend import Store
from kvcache_cli.store.migrations import utcnow

if TYPE_CHECKING:
    from kvcache_cli.retrieval.session_index import SessionIndex, SessionIndexes

RETRIEVAL_TRIGGERS = ("explain", "how to", "what is", "remember", "recall")
PROCESS_TIERS = (1, 2, 3)
# The replay's per-turn tier-3 lookup ranks the session's best plain-BM25 matches from
# its in-memory index (session_index), not every match: `kvcache retrieve` is unchanged.
# Measured on LoCoMo (bench/README.md): 50 candidates and bridges around the best 10 keep
# R@10 within 0.004 of ranking every match, at a quarter of the cost.
REPLAY_CANDIDATES = 50
REPLAY_BRIDGE_TOP = 10
# A session too big for the in-memory index (session_index.MAX_INDEXED_MESSAGES) ranks
# the store's own 50 best matches of the session instead.
BIG_SESSION_SEARCH: dict[str, Any] = {"max_session_matches": 50, "candidates": 50}
MAX_QUERY_CHARS = 4000  # retrieval during replay queries with at most this much of a question


from kvcache_cli.services.results import (  # noqa: E402  (re-exported: the public result types)
    ClearInfo,
    MaintenanceResult,
    ProcessResult,
    RestoreResult,
    SnapshotInfo,
    TurnOutcome,
    TurnReport,
)


# ----------------------------------------------------------------------------- helpers
def _entry_from_row(row: Any) -> KVEntry:
    return KVEntry(
        key_hash=row.key_hash,
        key_data=row.key_data,
        key_type=row.key_type,
        value_bytes=row.value_bytes,
        layer_index=row.layer_index,
        head_index=row.head_index,
        importance_score=row.importance,
        access_count=row.access_count,
        last_accessed=row.last_accessed,
        size_bytes=row.size_bytes,
        tokens=row.tokens,
        message_index=row.message_index,
    )


_ENTRY_COLUMNS = (
    "key_hash, key_data, key_type, value_bytes, layer_index, head_index, importance, "
    "access_count, last_accessed, size_bytes, tokens, message_index"
)


def _entries_from_tuples(rows: list[tuple[Any, ...]]) -> list[KVEntry]:
    """KVEntry objects from raw ``_ENTRY_COLUMNS`` rows (no model instances: hot path)."""
    to_datetime = m.CacheEntry.last_accessed.python_value
    return [
        KVEntry(
            key_hash=r[0],
            key_data=r[1],
            key_type=r[2],
            value_bytes=r[3],
            layer_index=r[4],
            head_index=r[5],
            importance_score=r[6],
            access_count=r[7],
            last_accessed=to_datetime(r[8]),
            size_bytes=r[9],
            tokens=r[10],
            message_index=r[11],
        )
        for r in rows
    ]


def _entry_row(entry: KVEntry, position: int) -> dict[str, Any]:
    return {
        "key_hash": entry.key_hash,
        "key_data": entry.key_data,
        "key_type": entry.key_type,
        "value_bytes": entry.value_bytes,
        "layer_index": entry.layer_index,
        "head_index": entry.head_index,
        "importance": entry.importance_score,
        "access_count": entry.access_count,
        "last_accessed": entry.last_accessed,
        "size_bytes": entry.size_bytes,
        "tokens": entry.tokens,
        "message_index": entry.message_index,
        "position": position,
    }


def _bulk_insert(model: Any, rows: list[dict[str, Any]], batch: int = 100) -> None:
    """Insert ``rows`` (dicts of field names) with one prepared statement.

    Values go through each field's ``db_value`` exactly as ``insert_many`` does, but
    without building SQL per row (peewee's query building dominated big imports).
    """
    if not rows:
        return
    names = list(rows[0])
    if any(len(r) != len(names) or any(n not in r for n in names) for r in rows):
        for start in range(0, len(rows), batch):
            model.insert_many(rows[start : start + batch]).execute()
        return
    meta = model._meta
    fields = [meta.fields[n] for n in names]
    defaults = [(f, d) for f, d in meta.defaults.items() if f.name not in rows[0]]
    fields += [f for f, _ in defaults]
    db = meta.database
    quote_chars: Any = getattr(db, "quote", None) or '""'
    left, right = quote_chars[0], quote_chars[1]

    def quote(name: str) -> str:
        return f"{left}{name}{right}"

    columns = ", ".join(quote(f.column_name) for f in fields)
    marks = ", ".join([db.param] * len(fields))
    sql = f"INSERT INTO {quote(meta.table_name)} ({columns}) VALUES ({marks})"
    given = fields[: len(names)]
    params = [
        tuple(f.db_value(r[n]) for f, n in zip(given, names, strict=True))
        + tuple(f.db_value(d() if callable(d) else d) for f, d in defaults)
        for r in rows
    ]
    db.cursor().executemany(sql, params)


def split_turns(messages: list[ChatMessage]) -> list[tuple[int, int]]:
    """``(start, end)`` index ranges of turns: a user message and the replies after it.

    Messages before the first user message join the first turn; a conversation with
    no user message is one turn without a question.
    """
    user_positions = [i for i, msg in enumerate(messages) if msg.role == "user"]
    if not user_positions:
        return [(0, len(messages))] if messages else []
    bounds = []
    for n, pos in enumerate(user_positions):
        start = 0 if n == 0 else pos
        end = user_positions[n + 1] if n + 1 < len(user_positions) else len(messages)
        bounds.append((start, end))
    return bounds


def should_retrieve(text: str) -> bool:
    """The seed's retrieval trigger, case-insensitive and not English-only.

    A question mark in any script, a long message, code, or a recall phrase.
    """
    if not text.strip():
        return False
    lowered = text.casefold()
    return (
        any(mark in text for mark in ("?", "？", "؟"))
        or len(text) > 100
        or "```" in text
        or any(trigger in lowered for trigger in RETRIEVAL_TRIGGERS)
    )


# ----------------------------------------------------------------------------- manager
class KVCacheManager:
    """The engine: process turns, clear, retrieve, snapshot, restore, maintain, stats."""

    def __init__(self, store: Store, config: Config | None = None, llm: Any = None) -> None:
        self.store = store
        self.config = config or Config()
        self.llm = llm
        # A client made from [llm].embeddings_url alone serves embeddings only: no chat
        # summaries and no /tokenize (that server's tokenizer is the embedding model's).
        self.chat_llm = None if llm is None or getattr(llm, "embeddings_only", False) else llm
        self.scorer = CacheEntryScorer()
        self.tokens = TokenCounter(
            self.chat_llm.tokenize if self.chat_llm is not None and self.config.llm.use_tokenize else None
        )
        self._server_n_ctx: int | None = None
        self.notices: list[str] = []
        self._embedder: Any = None  # embeddings.TurnEmbedder during process_conversation
        self.fusion: str | None = None  # hybrid fusion override (strategies.FUSIONS), for benches
        self._replay_indexes: SessionIndexes | None = None  # see ``_indexes``
        self._fts_len: dict[int, tuple[int, int, int, int]] = {}  # see ``_fts_avg_len``
        self._llm_down = False  # set after "cannot connect": no more server calls this run
        self._ready_summary: tuple[tuple[Any, ...], str | None] | None = None
        # False only in a parallel replay's worker (parallel_replay): its scratch store
        # keeps no full-text index (the merge indexes the rows in the real store), so a
        # search there is refused and the worker's conversation is replayed in the parent
        self.index_history = True

    # -------------------------------------------------------------- session access
    def _session(self, key: str) -> m.Session:
        row = m.Session.get_or_none(m.Session.key == key)
        if row is None:
            raise NotFoundError(f"unknown session {key!r}")
        return row

    def _session_row(self, key: str) -> m.Session | None:
        """SQLite: the session by key through one raw SELECT (the replay reads it every turn)."""
        fields = m.Session._meta.sorted_fields
        sql = f"SELECT {', '.join(f.column_name for f in fields)} FROM sessions WHERE key = ?"
        rows = self.store.query(sql, (key,))
        if not rows:
            return None
        row = m.Session(**{f.name: f.python_value(v) for f, v in zip(fields, rows[0], strict=True)})
        cast(Any, row)._dirty.clear()  # loaded, not changed: save() writes only what changes
        return row

    @property
    def _indexes(self) -> SessionIndexes:
        """A replay's per-session tier-3 indexes (made on first use: not imported by ``stats``)."""
        if self._replay_indexes is None:
            from kvcache_cli.retrieval.session_index import SessionIndexes

            self._replay_indexes = SessionIndexes()
        return self._replay_indexes

    def _save_session(self, session: m.Session) -> None:
        """``session.save()`` (every field but the key) as one raw UPDATE on SQLite."""
        if not self.store.is_sqlite:
            session.save()
            return
        meta = m.Session._meta
        fields = [f for f in meta.sorted_fields if f is not meta.primary_key]
        sql = f"UPDATE sessions SET {', '.join(f.column_name + ' = ?' for f in fields)} WHERE id = ?"
        self.store.query(sql, (*(f.db_value(getattr(session, f.name)) for f in fields), session.get_id()))

    def _session_for_update(self, key: str, create: bool, now: datetime) -> m.Session:
        if self.store.is_sqlite:
            row = self._session_row(key)
        else:
            row = m.Session.select().where(m.Session.key == key).for_update().first()
        if row is None and create and not self.store.is_sqlite:
            # a concurrent writer may be creating it too: insert once, then lock it
            m.Session.insert(
                key=key, created_at=now, last_activity=now, capacity_bytes=self.capacity()
            ).on_conflict_ignore().execute()
            row = m.Session.select().where(m.Session.key == key).for_update().first()
        if row is None:
            if not create:
                raise NotFoundError(f"unknown session {key!r}")
            row = m.Session.create(
                key=key,
                created_at=now,
                last_activity=now,
                capacity_bytes=self.capacity(),
            )
        return row

    def capacity(self) -> int:
        return capacity_bytes(self.config.model, self.config.cache, self._server_n_ctx)

    def set_server_n_ctx(self, n_ctx: int | None) -> None:
        """Use a slot's ``n_ctx`` (from the server's ``/slots``) for the capacity."""
        self._server_n_ctx = n_ctx

    def use_server_context(self, slot: int | None = None) -> None:
        """Take the capacity's ``n_ctx`` from the server's ``GET /slots`` when asked to.

        ``slot`` given (``process --slot N``): that slot's ``n_ctx`` (an unknown id is an
        error). Else ``[model] n_ctx = 0`` with a server: the smallest slot ``n_ctx``; when
        the server cannot say, a notice and the seed's estimate. A positive
        ``model.max_cache_bytes`` still wins over both.
        """
        if self.llm is None:
            return
        if slot is not None:
            self.set_server_n_ctx(self.llm.check_slot(slot).n_ctx)
            return
        if self.config.model.n_ctx != 0:
            return
        from kvcache_cli.errors import ServerError

        try:
            slots = self.llm.slots()
        except ServerError as exc:
            self.notices.append(f"capacity: {exc}; using the built-in estimate instead")
            return
        if slots:
            self.set_server_n_ctx(min(s.n_ctx for s in slots))

    def _active_entries(self, session: m.Session) -> list[KVEntry]:
        rows = self.store.query(
            f"SELECT {_ENTRY_COLUMNS} FROM cache_entries WHERE session_id = ? ORDER BY position, id",
            (session.get_id(),),
        )
        return _entries_from_tuples(rows)

    def _engagement(self, session: m.Session) -> dict[str, float]:
        rows = (
            m.Engagement.select(m.Engagement.key_hash, m.Engagement.score)
            .where(m.Engagement.session == session.id)
            .tuples()
        )
        return dict(m.rows_of(rows))

    def _record(self, session_key: str, kind: str, affected: int, details: str, now: datetime) -> None:
        # raw SQL: runs several times per replayed turn (peewee's query building dominated)
        self.store.query(
            "INSERT INTO operations (session_key, operation_type, timestamp, entries_affected, details) "
            "VALUES (?, ?, ?, ?, ?)",
            (session_key, kind, m.Operation.timestamp.db_value(now), int(affected), details),
        )

    def _bump_stats(self, now: datetime, **deltas: int) -> None:
        for name in deltas:
            if name not in m.Statistics._meta.fields or name in ("id", "last_operation"):
                raise ValueError(f"no statistics counter {name!r}")
        sets = ", ".join(f"{name} = {name} + ?" for name in deltas)
        self.store.query(
            f"UPDATE statistics SET {sets}{', ' if sets else ''}last_operation = ? WHERE id = 1",
            (*(int(v) for v in deltas.values()), m.Statistics.last_operation.db_value(now)),
        )

    # -------------------------------------------------------------- entries from messages
    def derive_entries(
        self,
        session_key: str,
        start_index: int,
        messages: list[ChatMessage],
        tokens: list[int],
        now: datetime,
    ) -> list[KVEntry]:
        """One entry per message: its text as key, its tokens x bytes/token as size."""
        per_token = self.config.model.bytes_per_token
        out = []
        for offset, (msg, count) in enumerate(zip(messages, tokens, strict=True)):
            index = start_index + offset
            entry = KVEntry(
                key_hash=key_hash_for(session_key, index, msg.content),
                key_data=msg.content,
                key_type="system_prompt" if msg.role in SYSTEM_ROLES else "attention_key",
                value_bytes=len(msg.content.encode("utf-8")),
                last_accessed=msg.timestamp or now,
                size_bytes=count * per_token,
                tokens=count,
                message_index=index,
            )
            entry.importance_score = self.scorer.score(entry, now)
            out.append(entry)
        return out

    def _file_entries(self, conv: Conversation, lo: int, hi: int, now: datetime) -> list[KVEntry]:
        """The file's own ``kv_entries`` that enter the cache with messages lo..hi-1."""
        per_token = self.config.model.bytes_per_token
        out = []
        for i, raw in enumerate(conv.kv_entries):
            where = f"{conv.place}kv_entries[{i}]"
            index = raw.get("message_index", 0)
            if not isinstance(index, int) or isinstance(index, bool):
                raise BadInputError(f"{where}.message_index: must be a whole number")
            if not lo <= index < hi:
                continue
            text = raw.get("key_data", raw.get("text"))
            value = raw.get("value_data")
            value_bytes = raw.get("value_bytes")
            if value_bytes is None:
                value_bytes = len(value.encode("utf-8")) if isinstance(value, str) else len(text or "")
            tokens = raw.get("tokens") or self.tokens.count([text or ""])[0]
            try:
                entry = KVEntry(
                    key_hash=str(
                        raw.get("key_hash") or key_hash_for(conv.session_key or "", -1 - i, text or "")
                    ),
                    key_data=text,
                    key_type=str(raw.get("key_type", "attention_key")),
                    value_bytes=int(value_bytes),
                    layer_index=int(raw.get("layer_index", 0)),
                    head_index=None if raw.get("head_index") is None else int(raw["head_index"]),
                    access_count=int(raw.get("access_count", 1)),
                    last_accessed=now,
                    size_bytes=int(raw.get("size_bytes") or int(tokens) * per_token),
                    tokens=int(tokens),
                    message_index=index,
                )
            except (TypeError, ValueError) as exc:
                raise BadInputError(f"{where}: {exc}") from None
            if raw.get("importance_score") is not None:
                entry.importance_score = float(raw["importance_score"])
            else:
                entry.importance_score = self.scorer.score(entry, now)
            out.append(entry)
        return out

    # -------------------------------------------------------------- process
    def check_prefix(self, session_key: str, messages: list[ChatMessage], label: str) -> int:
        """How many of ``messages`` are stored already; refuse a file that diverges."""
        if not self.store.is_sqlite:  # PostgreSQL text cannot hold NUL: refuse before any write
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
        session = m.Session.get_or_none(m.Session.key == session_key)
        if session is None:
            return 0
        stored = (
            m.Message.select(m.Message.message_index, m.Message.role, m.Message.content)
            .where(m.Message.session == session.id)
            .order_by(m.Message.message_index)
            .tuples()
        )
        return stored_prefix(m.rows_of(stored), messages, label, session_key)

    def process_conversation(
        self,
        conv: Conversation,
        session_key: str,
        on_turn: Callable[[int, int], None] | None = None,
    ) -> ProcessResult:
        """Replay a conversation turn by turn; already stored turns are skipped."""
        result = ProcessResult(session_id=session_key, source=conv.place.rstrip(": "))
        self._replay(conv, session_key, result, on_turn)
        return result

    def _replay(
        self,
        conv: Conversation,
        session_key: str,
        result: ProcessResult,
        on_turn: Callable[[int, int], None] | None = None,
        known_tokens: list[int] | None = None,
        outcome_of_last: bool = False,
    ) -> TurnOutcome | None:
        """Store and decide every turn of ``conv`` not stored yet, one transaction each.

        ``known_tokens``: the messages' token counts when already known (no counting).
        ``outcome_of_last``: read the full ``TurnOutcome`` of the last turn (the server's
        ``begin_turn``); otherwise only the reports are collected.
        """
        result.messages_total = len(conv.messages)
        result.capacity_bytes = self.capacity()
        done = self.check_prefix(session_key, conv.messages, result.source or session_key)
        if not self.store.is_sqlite and any(
            isinstance(v, str) and "\x00" in v for entry in conv.kv_entries for v in entry.values()
        ):
            raise BadInputError(
                f"{result.source or session_key}: kv_entries contain a NUL character, "
                "which PostgreSQL cannot store"
            )
        turns = split_turns(conv.messages)
        pending = [(lo, hi) for lo, hi in turns if hi > done]
        embedder = self._start_embeddings(session_key)  # also embeds stored messages lacking vectors
        outcome: TurnOutcome | None = None
        for number, (lo, hi) in enumerate(pending, start=1):
            if known_tokens is not None:
                tokens = known_tokens[max(lo, done) : hi]
            else:
                tokens = self.tokens.count([msg.content for msg in conv.messages[max(lo, done) : hi]])
            if embedder is not None and not self._server_down():  # HTTP before the turn's transaction
                embedder.prefetch(conv.messages, max(lo, done), hi)
            self._prepare_turn_summary(session_key, conv.messages[max(lo, done) : hi], tokens)
            full = outcome_of_last and number == len(pending)
            work = partial(self._turn, conv, session_key, lo, hi, tokens, result, full)
            outcome = self.store.transaction(work, self._forget_replay_state)
            if outcome is not None and outcome.report is not None:
                result.turns.append(outcome.report)
            if on_turn is not None:
                on_turn(number, len(pending))
        self._server_down()  # records a token-count failure as a notice
        result.notices.extend(self.notices)
        self.notices.clear()
        return outcome

    # -------------------------------------------------------------- the live turn API
    def begin_turn(self, session_key: str, messages: list[ChatMessage]) -> TurnOutcome:
        """Store a request's new messages and decide its turn (see docs: TURN_API).

        ``messages`` is the whole history through the new user message. The stored
        prefix is skipped (a history that diverges from it is a ``BadInputError``);
        earlier new turns are replayed as ``process`` would, each in its own
        transaction; the last one's decision is returned with what the prompt needs.
        """
        place = f"session {session_key}: "
        conv = Conversation(session_key=session_key, messages=list(messages), place=place)
        result = ProcessResult(session_id=session_key, source=f"session {session_key}")
        outcome = self._replay(conv, session_key, result, outcome_of_last=True)
        if outcome is None:  # nothing new: the state as it stands
            outcome = self.store.transaction(partial(self._outcome_now, session_key))
        outcome.messages_stored = result.messages_added
        outcome.notices = result.notices
        return outcome

    def finish_turn(self, session_key: str, reply: list[ChatMessage]) -> int:
        """Store the turn's reply messages after the stored history (one transaction).

        Returns how many messages were stored. Token counts and embeddings are
        fetched before the transaction.
        """
        if not reply:
            return 0
        self.check_prefix(session_key, [], f"session {session_key}")  # NUL check of the key
        tokens = self.tokens.count([msg.content for msg in reply])
        self._prefetch_vectors(session_key, reply)

        def work() -> int:
            wall = utcnow()
            session = self._session_for_update(session_key, create=False, now=wall)
            start = self._stored_count(session)
            self._store_reply(session, None, start, reply, tokens, reply[0].timestamp or wall)
            session.last_activity = wall
            self._save_session(session)
            return len(reply)

        stored = self.store.transaction(work, self._forget_replay_state)
        self._server_down()
        return stored

    def replace_reply(self, session_key: str, reply: list[ChatMessage]) -> int:
        """Regenerate: drop the stored messages after the last user message, store ``reply``.

        One transaction; the dropped messages leave the history, its full-text index,
        their vectors and the active cache. Returns how many messages were dropped.
        """
        tokens = self.tokens.count([msg.content for msg in reply])
        self._prefetch_vectors(session_key, reply)

        def work() -> int:
            wall = utcnow()
            session = self._session_for_update(session_key, create=False, now=wall)
            rows = self.store.query(
                "SELECT max(message_index) FROM messages WHERE session_id = ? AND role = 'user'",
                (session.get_id(),),
            )
            last_user = rows[0][0] if rows and rows[0][0] is not None else -1
            dropped = self._drop_messages_after(session, int(last_user))
            start = self._stored_count(session)
            if reply:
                self._store_reply(session, None, start, reply, tokens, reply[0].timestamp or wall)
            session.last_activity = wall
            self._save_session(session)
            return dropped

        dropped = self.store.transaction(work, self._forget_replay_state)
        self._forget_replay_state()
        self._server_down()
        return dropped

    def branch_session(self, source_key: str, new_key: str, n_messages: int) -> ProcessResult:
        """Edit: a new session replaying the first ``n_messages`` stored messages of another.

        The copy is replayed turn by turn (clears, summaries, snapshots as ``process``
        makes them) with the stored token counts, so no server is asked for counts.
        """
        source = self._session(source_key)
        if self.store.query("SELECT 1 FROM sessions WHERE key = ?", (new_key,)):
            raise BadInputError(f"session {new_key!r} exists already")
        rows = self.store.query(
            "SELECT role, content, name, timestamp, tokens FROM messages "
            "WHERE session_id = ? AND message_index < ? ORDER BY message_index",
            (source.get_id(), int(n_messages)),
        )
        to_time = m.Message.timestamp.python_value
        messages = [
            ChatMessage(role=role, content=content, name=name, timestamp=to_time(ts))
            for role, content, name, ts, _ in rows
        ]
        conv = Conversation(session_key=new_key, messages=messages, place=f"session {new_key}: ")
        result = ProcessResult(session_id=new_key, source=f"branch of {source_key}")
        self._replay(conv, new_key, result, known_tokens=[int(r[4]) for r in rows])
        return result

    def _prefetch_vectors(self, session_key: str, reply: list[ChatMessage]) -> None:
        """Embed reply messages before their transaction (indexes as they will be stored)."""
        embedder = self._start_embeddings(session_key)
        if embedder is None or self._server_down():
            return
        session = m.Session.get_or_none(m.Session.key == session_key)
        start = self._stored_count(session) if session is not None else 0
        padded: list[ChatMessage] = [ChatMessage(role="user", content="")] * start + list(reply)
        embedder.prefetch(padded, start, len(padded))

    def _stored_count(self, session: m.Session) -> int:
        """Messages stored for the session (contiguous from 0: max index + 1, from the index)."""
        return int(
            self.store.query(
                "SELECT COALESCE(MAX(message_index) + 1, 0) FROM messages WHERE session_id = ?",
                (session.get_id(),),
            )[0][0]
        )

    def _drop_messages_after(self, session: m.Session, index: int) -> int:
        """Delete the session's messages after ``index`` and their cache entries."""
        sid = session.get_id()
        ids = [
            r[0]
            for r in self.store.query(
                "SELECT id FROM messages WHERE session_id = ? AND message_index > ?", (sid, index)
            )
        ]
        if not ids:
            return 0
        if self.index_history:
            search.delete_messages(self.store, ids)
        self.store.query("DELETE FROM cache_entries WHERE session_id = ? AND message_index > ?", (sid, index))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            self.store.query(f"DELETE FROM embeddings WHERE message_id IN ({marks})", chunk)
            self.store.query(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
        size, count = self.store.query(
            "SELECT COALESCE(SUM(size_bytes), 0), count(*) FROM cache_entries WHERE session_id = ?", (sid,)
        )[0]
        session.cache_size_bytes = int(size)
        session.entry_count = int(count)
        return len(ids)

    def _outcome_now(self, session_key: str) -> TurnOutcome:
        session = self._session_for_update(session_key, create=False, now=utcnow())
        return self._outcome(session, None, None)

    def _outcome(
        self, session: m.Session, report: TurnReport | None, found: RetrievalResult | None
    ) -> TurnOutcome:
        """The turn's decision with what a prompt builder needs (inside the transaction)."""
        sid = session.get_id()
        summary = self.store.query("SELECT text FROM summaries WHERE session_id = ?", (sid,))
        start = self.store.query(
            "SELECT max(message_index) FROM turn_log WHERE session_id = ? AND cleared = ?",
            (sid, m.TurnLog.cleared.db_value(True)),
        )
        return TurnOutcome(
            session_id=session.key,
            report=report,
            retrieved=list(found.entries) if found is not None else [],
            summary=summary[0][0] if summary else None,
            active=self._active_entries(session),
            context_start=int(start[0][0]) if start and start[0][0] is not None else 0,
        )

    def _prepare_turn_summary(self, session_key: str, msgs: list[ChatMessage], tokens: list[int]) -> None:
        """Before a turn's transaction: when the turn looks set to clear, get the LLM summary now.

        Predicts ``_decide``'s clear from the stored session (turn count, cache size plus
        the turn's new messages), so the chat request runs outside the write lock.
        """
        self._ready_summary = None
        if self.chat_llm is None or self._server_down():
            return
        user_pos = next((i for i, msg in enumerate(msgs) if msg.role == "user"), None)
        if user_pos is None:
            return
        cfg = self.config.cache
        session = m.Session.get_or_none(m.Session.key == session_key)
        count = (session.conversation_count if session else 0) + 1
        usage = (session.cache_size_bytes if session else 0) + sum(
            tokens[: user_pos + 1]
        ) * self.config.model.bytes_per_token
        capacity = self.capacity()
        by_memory = capacity > 0 and usage / capacity >= cfg.memory_threshold_percent
        if count >= cfg.clear_after_conversations or by_memory:
            self._prepare_summary(session_key, msgs[: user_pos + 1])

    def _summary_state(self, session: Any, extra: int = 0) -> tuple[Any, int, list[ChatMessage], str | None]:
        """(key, since, messages to summarize, prior text) of a session's next summary."""
        existing = m.Summary.get_or_none(m.Summary.session == session) if session is not None else None
        since = existing.messages_summarized if existing else 0
        total = (
            m.Message.select().where(m.Message.session == session).count() if session is not None else 0
        ) + extra
        stored = self._summary_messages(session, since) if session is not None else []
        prior = existing.text if existing else None
        return (since, total, prior), since, stored, prior

    def _prepare_summary(self, session_key: str, new_msgs: list[ChatMessage]) -> None:
        """Ask the LLM for the summary of the coming clear now, outside the write transaction.

        ``_write_summary`` uses it only if the session is still in the state it was made
        for (else, after a race with another writer, it asks inside as before).
        """
        self._ready_summary = None
        if self.chat_llm is None or self._server_down():
            return
        session = m.Session.get_or_none(m.Session.key == session_key)
        key, _since, stored, prior = self._summary_state(session, len(new_msgs))
        messages = (stored + new_msgs)[-TAIL_MESSAGES:]
        if len(messages) < MIN_MESSAGES:
            return
        from kvcache_cli.errors import ServerError
        from kvcache_cli.llm.client import summarize

        try:
            text = summarize(self.llm, prior, [msg.to_dict() for msg in messages])
        except ServerError as exc:
            self._llm_down = self._llm_down or str(exc).startswith("cannot connect")
            notice = f"summary: {exc}; used the extractive summary instead"
            if notice not in self.notices:
                self.notices.append(notice)
            text = None
        self._ready_summary = (key, text)

    def _server_down(self) -> bool:
        """Whether a call this run found the server unreachable (then it is not asked again)."""
        if self.tokens.failure and not any(n.startswith("token counts:") for n in self.notices):
            self.notices.append(f"token counts: {self.tokens.failure}; estimated from characters instead")
        failures = (self.tokens.failure, getattr(self._embedder, "failure", None))
        if any(f and f.startswith("cannot connect") for f in failures):
            self._llm_down = True
        return self._llm_down

    def _start_embeddings(self, session_key: str) -> Any:
        """The run's embedder when ``generate_cache_embeddings`` and a server are on.

        Also embeds the session's already stored messages that lack a vector (HTTP
        outside any transaction). See ``embeddings`` for the model/dimension policy.
        """
        if self.llm is None or not self.config.cache.generate_cache_embeddings or self._server_down():
            return None
        from kvcache_cli.retrieval.embeddings import TurnEmbedder, backfill_session

        if self._embedder is None:
            self._embedder = TurnEmbedder(self.llm, self.store, self.notices)
        self._embedder.vectors.clear()
        session = m.Session.get_or_none(m.Session.key == session_key)
        if session is not None and not self._embedder.failed:
            backfill_session(self._embedder, session.get_id(), utcnow())
        return self._embedder if not self._embedder.failed else None

    def _turn(
        self,
        conv: Conversation,
        session_key: str,
        lo: int,
        hi: int,
        tokens: list[int],
        result: ProcessResult,
        full_outcome: bool = False,
    ) -> TurnOutcome | None:
        """One turn in one transaction: store, decide, clear, snapshot, retrieve, store the reply."""
        wall = utcnow()
        session = self._session_for_update(session_key, create=True, now=wall)
        stored = self._stored_count(session)
        if stored >= hi:
            return None  # another process stored this turn meanwhile
        start = max(lo, stored)
        if start != max(lo, hi - len(tokens)):
            # another process stored part of it: recount for what is left
            tokens = self.tokens.count([msg.content for msg in conv.messages[start:hi]])
        msgs = conv.messages[start:hi]
        user_pos = next((i for i, msg in enumerate(msgs) if msg.role == "user"), None)
        question = msgs[user_pos] if user_pos is not None else None
        now = (question.timestamp if question and question.timestamp else None) or wall
        cut = (user_pos + 1) if user_pos is not None else len(msgs)
        before, after = msgs[:cut], msgs[cut:]
        new_entries = self._insert_messages(session, start, before, tokens[:cut], now)
        new_entries += self._file_entries(conv, start, start + cut, now)
        result.messages_added += len(before)
        active = self._active_entries(session)
        self._add_to_cache(session, new_entries, len(active))
        active += new_entries
        report: TurnReport | None = None
        found: RetrievalResult | None = None
        if question is not None and user_pos is not None:
            report, found = self._decide(session, active, start + user_pos, question, now)
        outcome = self._outcome(session, report, found) if full_outcome else TurnOutcome(session_key, report)
        if after:
            self._store_reply(session, conv, start + cut, after, tokens[cut:], now)
            result.messages_added += len(after)
        session.last_activity = wall
        self._save_session(session)
        return outcome

    def _store_reply(
        self,
        session: m.Session,
        conv: Conversation | None,
        start: int,
        msgs: list[ChatMessage],
        tokens: list[int],
        now: datetime,
    ) -> None:
        """Store the messages after a turn's question and add them to the cache (in a transaction)."""
        later = self._insert_messages(session, start, msgs, tokens, now)
        if conv is not None:
            later += self._file_entries(conv, start, start + len(msgs), now)
        self._add_to_cache(session, later, session.entry_count)
        session.cache_size_bytes += sum(e.size_bytes for e in later)
        session.entry_count += len(later)

    def _insert_messages(
        self, session: m.Session, start: int, msgs: list[ChatMessage], tokens: list[int], now: datetime
    ) -> list[KVEntry]:
        if not msgs:
            return []
        rows = [
            {
                "session": session.id,
                "message_index": start + i,
                "role": msg.role,
                "name": msg.name,
                "content": msg.content,
                "tokens": tokens[i],
                "timestamp": msg.timestamp,
            }
            for i, msg in enumerate(msgs)
        ]
        _bulk_insert(m.Message, rows)
        ids = self.store.query(
            "SELECT id, message_index, content FROM messages "
            "WHERE session_id = ? AND message_index >= ? ORDER BY message_index",
            (session.get_id(), start),
        )
        if self.index_history:
            search.index_messages(self.store, [(mid, session.id, content) for mid, _, content in ids])
        if self._embedder is not None:  # vectors computed before this transaction
            self._embedder.store_for([(mid, index) for mid, index, _ in ids], utcnow())
        return self.derive_entries(session.key, start, msgs, tokens, now)

    def _add_to_cache(self, session: m.Session, entries: list[KVEntry], position: int) -> None:
        if not entries:
            return
        rows = []
        for offset, entry in enumerate(entries):
            row = _entry_row(entry, position + offset)
            row["session"] = session.id
            rows.append(row)
        hashes = [r["key_hash"] for r in rows]
        existing = {
            h
            for (h,) in self.store.query(
                "SELECT key_hash FROM cache_entries WHERE session_id = ? "
                f"AND key_hash IN ({', '.join('?' * len(hashes))})",
                (session.get_id(), *hashes),
            )
        }
        rows = [r for r in rows if r["key_hash"] not in existing]
        _bulk_insert(m.CacheEntry, rows)

    def _decide(
        self, session: m.Session, active: list[KVEntry], user_index: int, question: ChatMessage, now: datetime
    ) -> tuple[TurnReport, RetrievalResult | None]:
        """The seed's ``process_conversation`` for the turn ending in ``question``."""
        cfg = self.config.cache
        capacity = self.capacity()
        usage = sum(e.size_bytes for e in active)
        count = session.conversation_count + 1
        by_turns = count >= cfg.clear_after_conversations
        by_memory = capacity > 0 and usage / capacity >= cfg.memory_threshold_percent
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
        if by_turns or by_memory:
            reason = "ConversationLimit" if by_turns else "MemoryThreshold"
            clear = self._clear(session, active, reason, now, turn=session.turn_count)
            report.clear = clear
            if clear.snapshot_id is not None:
                report.snapshot_ids.append(clear.snapshot_id)
            if cfg.bridge_enabled:
                bridges.append(clear.bridge_message)
            active = [e for e in active if e.key_hash in clear.kept_keys]
        elif session.last_cleared_at is not None and cfg.bridge_enabled:
            summary = self.store.query("SELECT text FROM summaries WHERE session_id = ?", (session.get_id(),))
            if summary:
                bridges.insert(0, bridge.summary_prior(summary[0][0]))
        snap = self._periodic_snapshot(session, active, now)
        if snap is not None:
            report.snapshot_ids.append(snap)
        if cfg.retrieval_enabled and should_retrieve(question.content):
            qvec = self._embedder.vector_for(user_index) if self._embedder is not None else None
            found = self._retrieve_in_session(
                session,
                question.content[:MAX_QUERY_CHARS],  # a huge message queries by its start
                tiers=PROCESS_TIERS,
                limit=20,
                cascade=True,
                exclude_from=user_index,
                active=active,
                now=now,
                semantic=(qvec, self._embedder.model) if qvec is not None else None,
            )
            report.retrieval_tiers = found.tiers_searched
            report.retrieved = len(found.entries)
            if found.bridge_message and cfg.bridge_enabled:
                bridges.append(found.bridge_message)
        report.bridge_messages = bridges
        self.store.query(  # raw: once per replayed turn
            "INSERT INTO turn_log (session_id, turn_index, message_index, cache_size_bytes, entry_count, "
            "cleared, clear_reason, retrieved) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                session.get_id(),
                session.turn_count,
                user_index,
                report.cache_size_bytes,
                report.entry_count,
                m.TurnLog.cleared.db_value(report.clear is not None),
                report.clear.reason if report.clear else None,
                report.retrieved,
            ),
        )
        return report, found

    # -------------------------------------------------------------- clear
    def _summary_messages(self, session: m.Session, since: int) -> list[ChatMessage]:
        rows = self.store.query(
            "SELECT role, content, name FROM messages WHERE session_id = ? AND message_index >= ? "
            "ORDER BY message_index DESC LIMIT ?",
            (session.get_id(), int(since), TAIL_MESSAGES),
        )
        return [ChatMessage(role=role, content=content, name=name) for role, content, name in reversed(rows)]

    def _write_summary(self, session: m.Session, now: datetime) -> tuple[str | None, str | None]:
        """Update the session's cumulative summary; returns (text, source)."""
        existing = m.Summary.get_or_none(m.Summary.session == session.id)
        since = existing.messages_summarized if existing else 0
        count_sql = "SELECT count(*) FROM messages WHERE session_id = ?"
        total = int(self.store.query(count_sql, (session.get_id(),))[0][0])
        messages = self._summary_messages(session, since)
        if len(messages) < MIN_MESSAGES:
            return (existing.text, existing.source) if existing else (None, None)
        prior = existing.text if existing else None
        text: str | None = None
        source = "extractive"
        ready, self._ready_summary = self._ready_summary, None
        if ready is not None and ready[0] == (since, total, prior):
            text = ready[1]  # asked before the transaction (None: it failed, notice given)
            source = "llm" if text else "extractive"
        elif self.chat_llm is not None and self._server_down():
            notice = "summary: the LLM server is unreachable; used the extractive summary instead"
            if notice not in self.notices:
                self.notices.append(notice)
        elif self.chat_llm is not None:
            from kvcache_cli.errors import ServerError
            from kvcache_cli.llm.client import summarize

            try:
                text = summarize(self.chat_llm, prior, [msg.to_dict() for msg in messages])
                source = "llm"
            except ServerError as exc:
                self._llm_down = self._llm_down or str(exc).startswith("cannot connect")
                notice = f"summary: {exc}; used the extractive summary instead"
                if notice not in self.notices:
                    self.notices.append(notice)
        if not text:
            text = extractive_summary(prior, messages)
            source = "extractive"
        if not text:
            return (prior, existing.source if existing else None)
        token_count = max(1, len(text) // 4)
        if existing is None:
            m.Summary.create(
                session=session.id,
                text=text,
                token_count=token_count,
                messages_summarized=total,
                clear_count=1,
                source=source,
                updated_at=now,
            )
        else:
            existing.text = text
            existing.token_count = token_count
            existing.messages_summarized = total
            existing.clear_count += 1
            existing.source = source
            existing.updated_at = now
            existing.save()
        return text, source

    def _clear(
        self, session: m.Session, active: list[KVEntry], reason: str, now: datetime, turn: int
    ) -> ClearInfo:
        """Clear the active cache, keeping the important entries (one transaction)."""
        cfg = self.config.cache
        engagement = self._engagement(session)
        extracted = extract_entries(active, self.scorer, now, engagement)
        preserved = filter_preserved(
            extracted, cfg.min_importance_to_preserve, cfg.preserve_system_prompts, cfg.preserve_code_entries
        )
        budget = int(self.capacity() * cfg.memory_threshold_percent * PRESERVE_SHARE)
        preserved = fit_to_budget(preserved, budget)
        kept_keys = {p.entry.key_hash for p in preserved}
        snapshot_id = None
        if self._snapshot_on_clear(reason):
            snapshot_id = self._snapshot(session, active, f"clear:{reason}", now, turn)
        keywords = [k for p in preserved for k in p.keywords][:10]
        text, source = self._write_summary(session, now)
        cleared = len(active) - len(preserved)
        message = bridge.summary_now(text) if text else bridge.clear_bridge(cleared, len(preserved), keywords)
        before = sum(e.size_bytes for e in active)
        keep = sorted(kept_keys)
        delete = m.CacheEntry.delete().where(m.CacheEntry.session == session.id)
        if keep:
            delete = delete.where(m.CacheEntry.key_hash.not_in(keep))
        delete.execute()
        kept_entries = [p.entry for p in preserved]
        self._bump_stats(now, total_clears=1, entries_preserved=len(preserved), entries_cleared=cleared)
        self._record(session.key, "clear", len(active), reason, now)
        session.conversation_count = 0
        session.last_cleared_at = now
        session.total_clears += 1
        session.entry_count = len(kept_entries)
        session.cache_size_bytes = sum(e.size_bytes for e in kept_entries)
        if snapshot_id is not None:
            session.last_snapshot_id = snapshot_id
        meta = json.loads(session.metadata or "{}")
        meta["last_clear_reason"] = reason
        session.metadata = json.dumps(meta, sort_keys=True)
        return ClearInfo(
            session_id=session.key,
            turn=turn,
            reason=reason,
            entries_cleared=cleared,
            entries_preserved=len(preserved),
            preserved_keywords=keywords,
            snapshot_id=snapshot_id,
            summary_source=source,
            bridge_message=message,
            cache_size_bytes_before=before,
            kept_keys=kept_keys,
        )

    def clear(self, session_key: str, reason: str = "Manual") -> ClearInfo:
        """Manual clear (``ClearReason::Manual``) with preservation and summary."""

        def work() -> ClearInfo:
            now = utcnow()
            session = self._session_for_update(session_key, create=False, now=now)
            active = self._active_entries(session)
            info = self._clear(session, active, reason, now, turn=session.turn_count)
            session.last_activity = now
            session.save()
            return info

        self._prepare_summary(session_key, [])  # the LLM call runs before the write lock
        return self.store.transaction(work)

    # -------------------------------------------------------------- snapshots
    def _snapshot_on_clear(self, reason: str) -> bool:
        cfg = self.config.cache
        if not cfg.enabled:
            return False
        kind = cfg.snapshot.strategy
        if kind == "none":
            return False
        if kind == "incremental":
            return reason == "ConversationLimit"
        return True

    def _periodic_snapshot(self, session: m.Session, active: list[KVEntry], now: datetime) -> int | None:
        cfg = self.config.cache
        snap = cfg.snapshot
        if not cfg.enabled or snap.strategy == "none" or snap.interval_conversations <= 0:
            return None
        if session.turn_count % snap.interval_conversations != 0 or not active:
            return None
        return self._snapshot(session, active, "interval", now, session.turn_count)

    def _snapshot(
        self, session: m.Session, entries: list[KVEntry], reason: str, now: datetime, turn: int
    ) -> int | None:
        """Store a self-contained snapshot; de-duplicated by hash; pruned to the max."""
        snap = self.config.cache.snapshot
        kind = snap.strategy if snap.strategy != "none" else "full"
        if kind == "adaptive":
            entries = [e for e in entries if e.importance_score >= snap.min_importance_threshold]
            if not entries:
                return None
        state_hash = entries_hash(entries)
        last = self.store.query(
            "SELECT state_hash FROM snapshots WHERE session_id = ? ORDER BY created_at DESC, id DESC LIMIT 1",
            (session.get_id(),),
        )
        if reason == "interval" and last and last[0][0] == state_hash:
            return None
        kind_name = kind if kind != "adaptive" else "checkpoint"
        row = self._store_snapshot(session, entries, kind_name, reason, turn, state_hash, now)
        if snap.max_snapshots > 0:
            self._prune_session_snapshots(session.id, snap.max_snapshots, dry_run=False)
        return int(row.id)

    def _store_snapshot(
        self,
        session: m.Session,
        entries: list[KVEntry],
        kind: str,
        reason: str,
        turn: int,
        state_hash: str,
        now: datetime,
    ) -> m.Snapshot:
        """Insert a snapshot and its entries, count it and record the operation."""
        values: dict[str, Any] = {
            "id": self._next_snapshot_id(),
            "session": session.id,
            "turn_index": turn,
            "snapshot_type": kind,
            "reason": reason,
            "state_hash": state_hash,
            "entry_count": len(entries),
            "size_bytes": sum(e.size_bytes for e in entries),
            "created_at": now,
        }
        _bulk_insert(m.Snapshot, [values])  # Snapshot.create without peewee's query building
        row = m.Snapshot(**values)
        rows = []
        for position, entry in enumerate(entries):
            data = _entry_row(entry, position)
            data["snapshot"] = row.id
            rows.append(data)
        _bulk_insert(m.SnapshotEntry, rows)
        self._bump_stats(now, total_snapshots=1)
        self._record(session.key, "snapshot", len(entries), f"Snapshot ID: {row.id}", now)
        session.last_snapshot_id = row.id
        return row

    def _next_snapshot_id(self) -> int:
        """An id never issued before, even after the newest snapshots were deleted.

        SQLite reuses ``max(id) + 1`` once the top rows are gone, which would let an old
        ``restore`` id or an operation record ("Snapshot ID: 7") point at a different
        snapshot. Every snapshot ever made is counted in ``statistics.total_snapshots``
        (bumped after each insert), so ``max(max id, that count) + 1`` is always new.
        Called inside the write transaction that inserts the row; on PostgreSQL the
        statistics row is locked first, so concurrent writers take turns.
        """
        lock = "" if self.store.is_sqlite else " FOR UPDATE"  # PostgreSQL: one writer at a time
        made = self.store.query(f"SELECT total_snapshots FROM statistics WHERE id = 1{lock}")[0][0] or 0
        top = self.store.query("SELECT max(id) FROM snapshots")[0][0] or 0
        return int(max(top, made)) + 1

    def _prune_session_snapshots(self, session_id: int, keep: int, dry_run: bool) -> list[int]:
        """Drop all but the newest ``keep`` snapshots; ties broken by id (newest wins)."""
        # raw SQL: runs after every snapshot of a replay
        tail = "LIMIT -1 OFFSET ?" if self.store.is_sqlite else "OFFSET ?"
        rows = self.store.query(
            f"SELECT id FROM snapshots WHERE session_id = ? ORDER BY created_at DESC, id DESC {tail}",
            (int(session_id), int(keep)),
        )
        ids = [r[0] for r in rows]
        if ids and not dry_run:
            marks = ", ".join("?" * len(ids))
            self.store.query(f"DELETE FROM snapshot_entries WHERE snapshot_id IN ({marks})", ids)
            self.store.query(f"DELETE FROM snapshots WHERE id IN ({marks})", ids)
        return ids

    def snapshot(self, session_key: str, slot: Any = None, slot_id: int | None = None) -> SnapshotInfo:
        """Snapshot the session's active cache now (type by the configured strategy).

        ``slot`` is the server's ``SlotSaveResult`` of ``snapshot --slot``, ``slot_id`` the
        slot it was saved from (the result itself does not carry the id).
        """

        def work() -> SnapshotInfo:
            now = utcnow()
            session = self._session_for_update(session_key, create=False, now=now)
            active = self._active_entries(session)
            row = self._store_snapshot(
                session, active, "full", "manual", session.turn_count, entries_hash(active), now
            )
            if slot is not None:
                row.slot_id = slot_id if slot_id is not None else getattr(slot, "slot_id", None)
                row.slot_filename = slot.filename
                row.slot_n_saved = slot.n_saved
                row.slot_n_written = slot.n_written
                row.save()
            session.last_activity = now
            session.save()
            return self._snapshot_info(row, session.key)

        return self.store.transaction(work)

    @staticmethod
    def _snapshot_info(row: Any, session_key: str) -> SnapshotInfo:
        return SnapshotInfo(
            id=row.id,
            session_id=session_key,
            snapshot_type=row.snapshot_type,
            reason=row.reason,
            entry_count=row.entry_count,
            size_bytes=row.size_bytes,
            state_hash=row.state_hash,
            created_at=row.created_at,
            turn_index=row.turn_index,
            slot_id=row.slot_id,
            slot_filename=row.slot_filename,
            slot_n_saved=row.slot_n_saved,
            slot_n_written=row.slot_n_written,
        )

    def list_snapshots(self, session_key: str | None = None) -> list[SnapshotInfo]:
        query = m.Snapshot.select(m.Snapshot, m.Session.key).join(m.Session)
        if session_key is not None:
            session = self._session(session_key)
            query = query.where(m.Snapshot.session == session.id)
        query = query.order_by(m.Session.key, m.Snapshot.created_at, m.Snapshot.id)
        return [self._snapshot_info(row, row.session.key) for row in query]

    def get_snapshot(self, session_key: str, snapshot_id: int) -> SnapshotInfo:
        session = self._session(session_key)
        row = m.Snapshot.get_or_none((m.Snapshot.id == snapshot_id) & (m.Snapshot.session == session.id))
        if row is None:
            raise NotFoundError(f"unknown snapshot {snapshot_id} for session {session_key!r}")
        return self._snapshot_info(row, session_key)

    def snapshot_entries(self, snapshot_id: int) -> list[KVEntry]:
        rows = self.store.query(
            f"SELECT {_ENTRY_COLUMNS} FROM snapshot_entries WHERE snapshot_id = ? ORDER BY position, id",
            (int(snapshot_id),),
        )
        return _entries_from_tuples(rows)

    def _snapshot_entries_cached(self, snapshot_id: int, state_hash: str) -> list[KVEntry]:
        """A snapshot's entries for tier-2 search, kept per (id, hash): snapshots never change.

        Callers must not modify the returned entries. ``restore`` reads the store itself.
        """
        key = (int(snapshot_id), state_hash)
        cache: dict[tuple[int, str], list[KVEntry]] = self.__dict__.setdefault("_snap_cache", {})
        entries = cache.get(key)
        if entries is None:
            entries = self.snapshot_entries(snapshot_id)
            if len(cache) >= 64:
                cache.pop(next(iter(cache)))
            cache[key] = entries
        return entries

    def active_entries(self, session_key: str) -> list[KVEntry]:
        return self._active_entries(self._session(session_key))

    def restore(
        self, session_key: str, snapshot_id: int, slot_n_restored: int | None = None
    ) -> RestoreResult:
        """Replace the active cache with a snapshot's entries, after checking its hash."""

        def work() -> RestoreResult:
            now = utcnow()
            session = self._session_for_update(session_key, create=False, now=now)
            row = m.Snapshot.get_or_none((m.Snapshot.id == snapshot_id) & (m.Snapshot.session == session.id))
            if row is None:
                raise NotFoundError(f"unknown snapshot {snapshot_id} for session {session_key!r}")
            entries = self.snapshot_entries(row.id)
            if entries_hash(entries) != row.state_hash or len(entries) != row.entry_count:
                raise IntegrityError(
                    f"snapshot {snapshot_id} of session {session_key!r} failed its integrity check"
                )
            m.CacheEntry.delete().where(m.CacheEntry.session == session.id).execute()
            self._add_to_cache(session, entries, 0)
            age = int((now - row.created_at).total_seconds() // 60)
            message = bridge.restore_bridge(len(entries), max(age, 0))
            self._bump_stats(now, total_restores=1)
            self._record(session.key, "restore", len(entries), f"Snapshot ID: {row.id}", now)
            session.entry_count = len(entries)
            session.cache_size_bytes = sum(e.size_bytes for e in entries)
            session.last_snapshot_id = row.id
            session.last_activity = now
            session.save()
            return RestoreResult(
                session.key, row.id, len(entries), session.cache_size_bytes, message, slot_n_restored
            )

        return self.store.transaction(work)

    # -------------------------------------------------------------- retrieval
    def _retrieve_in_session(
        self,
        session: m.Session,
        query: str,
        tiers: tuple[int, ...],
        limit: int,
        cascade: bool,
        exclude_from: int | None,
        active: list[KVEntry] | None,
        now: datetime,
        min_score: float = 0.0,
        semantic: tuple[list[float], str] | None = None,
        notice: str | None = None,
    ) -> RetrievalResult:
        """Search the tiers of one session and record the retrieval (inside a transaction).

        ``semantic`` is the query's embedding and model name (computed before the
        transaction); without it a semantic strategy runs as keyword_only (``notice``).
        """
        from kvcache_cli.retrieval import strategies as st

        started = time.perf_counter()
        result = self._new_result(query, semantic, notice)
        strategy = result.strategy
        sims = self._semantic_scores(session.get_id(), semantic) if semantic is not None else None
        hy = self.config.cache.hybrid
        lookup: dict[tuple[str, Any], float] | None = None
        ctx: dict[int, float] = {}
        if sims and strategy == "hybrid":  # the semantic side with neighbour context
            ctx = st.semantic_context({idx: cos for idx, (_, cos) in sims.items()})
            lookup = {(session.key, idx): v for idx, v in ctx.items()}

        def combine(
            kw: list[RetrievedEntry], sem: list[RetrievedEntry] | None, need: int
        ) -> list[RetrievedEntry]:
            return st.combine(
                strategy, kw, sem, need, keep, hy.keyword_weight, hy.semantic_weight, self.fusion, lookup
            )

        found: list[RetrievedEntry] = []
        thresholds = TIER_THRESHOLDS if cascade else {1: min_score, 2: min_score, 3: min_score}
        # a replay's turn reads the session from its in-memory index (session_index)
        index = self._indexes.get(self.store, session.get_id()) if cascade else None
        if active is None:
            active = self._active_entries(session)
        in_cache = {e.message_index for e in active if e.message_index is not None}

        def keep(item: RetrievedEntry) -> bool:
            if (
                exclude_from is not None
                and item.message_index is not None
                and item.message_index >= exclude_from
            ):
                return False
            return item.score > thresholds[item.tier] or (not cascade and item.score >= min_score)

        # a keyword list longer than a tier takes changes nothing unless fusion or a
        # semantic-first fill reads its tail: then rank only the best ``need``
        def kw_cap(need: int) -> int | None:
            exact = sims is None or strategy in ("keyword_only", "keyword_then_semantic")
            return need if exact else None

        if 1 in tiers and active:
            result.tiers_searched.append(1)
            # the question itself (and anything after it) is no candidate, nor anyone's context
            past = [
                e
                for e in active
                if exclude_from is None or e.message_index is None or e.message_index < exclude_from
            ]
            hits = rank_entries(
                query, past, 1, session.key, names=self._entry_names(session, past, index), limit=kw_cap(10)
            )
            sem1 = st.semantic_entries(active, sims, 1, session.key, result.keywords_used)
            found += combine(hits, sem1, 10)[:10]
        if 2 in tiers and (not cascade or len(found) < 5):
            result.tiers_searched.append(2)
            snaps = self.store.query(
                "SELECT id, state_hash FROM snapshots WHERE session_id = ? "
                "ORDER BY created_at DESC, id DESC LIMIT 3",
                (session.get_id(),),
            )
            entries: list[KVEntry] = []
            owners: list[int | None] = []
            seen_keys: set[str] = set()
            for sid, state_hash in snaps:
                for entry in self._snapshot_entries_cached(sid, state_hash):
                    if entry.key_hash in seen_keys:
                        continue
                    if cascade and entry.message_index in in_cache:
                        continue
                    if exclude_from is not None and (entry.message_index or 0) >= exclude_from:
                        continue
                    seen_keys.add(entry.key_hash)
                    entries.append(entry)
                    owners.append(sid)
            hits = rank_entries(
                query, entries, 2, session.key, owners, self._entry_names(session, entries, index), kw_cap(15)
            )
            sem2 = st.semantic_entries(entries, sims, 2, session.key, result.keywords_used, owners)
            found += combine(hits, sem2, 15)[:15]
        if 3 in tiers and (not cascade or len(found) < 3):
            result.tiers_searched.append(3)
            skip = in_cache if cascade else set()
            cap = 10 if cascade else limit * 2
            if cascade:  # a replay's turn: results filtered inside the ranking

                def wanted(idx: int) -> bool:
                    return idx not in skip and (exclude_from is None or idx < exclude_from)

                if index is not None:  # the session's in-memory index
                    kw3 = self._replay_history(query, session, index, kw_cap(cap) or limit * 2 + 10, wanted)
                else:  # a session too big to index: the store's best matches
                    options = self._big_session_search(session)
                    hits = self._search_history(query, session, limit * 2 + 10, **options)
                    kw3 = [h for h in hits if h.message_index is not None and wanted(h.message_index)]
            else:
                kw3 = self._search_history(query, session, limit * 2 + 10)
            sem3 = None
            if sims is not None:
                best = sorted(
                    ((ctx.get(idx, cos), cos, mid) for idx, (mid, cos) in sims.items() if idx not in skip),
                    key=lambda x: (-x[0], x[2]),
                )[: limit * 2 + 10]
                sem3 = self._history_entries(
                    [(mid, st.semantic_score(cos), None) for _, cos, mid in best], session, query
                )
            found += combine(kw3, sem3, cap)[:cap]
        self._finish_result(result, merge_results(found, limit), started)
        self._after_retrieval(session, result, now)
        return result

    def _new_result(
        self, query: str, semantic: tuple[list[float], str] | None, notice: str | None
    ) -> RetrievalResult:
        """An empty result for ``query`` with the strategy that will run (keyword_only for a
        semantic strategy without the query's embedding), the notice and the keywords."""
        from kvcache_cli.retrieval import strategies as st
        from kvcache_cli.retrieval.textsearch import query_terms

        result = RetrievalResult(query=query, strategy=self.config.cache.retrieval_strategy)
        if notice:
            result.notices.append(notice)
        if semantic is None and st.needs_semantic(result.strategy):
            result.strategy = "keyword_only"
        result.keywords_used = query_terms(query)
        return result

    @staticmethod
    def _finish_result(result: RetrievalResult, entries: list[RetrievedEntry], started: float) -> None:
        """Set the entries, the seed's retrieval bridge (when any) and the duration."""
        result.entries = entries
        if entries:
            result.bridge_message = bridge.retrieval_bridge(
                len(entries), result.primary_tier, result.keywords_used, result.average_similarity
            )
        result.search_duration_ms = (time.perf_counter() - started) * 1000.0

    def _entry_names(
        self, session: m.Session, entries: list[KVEntry], index: SessionIndex | None = None
    ) -> dict[int, str]:
        """Speaker names of the messages behind cache/snapshot entries (tier 1-2 speaker boost)."""
        idxs = sorted({e.message_index for e in entries if e.message_index is not None})
        out: dict[int, str] = {}
        if index is not None:  # a replay's turn: the synced index has every stored message
            for idx in idxs:
                doc = index.docs.get(idx)
                if doc is not None and doc.name:
                    out[idx] = doc.name
            return out
        for start in range(0, len(idxs), 500):
            chunk = idxs[start : start + 500]
            for idx, name in self.store.query(
                "SELECT message_index, name FROM messages WHERE session_id = ? AND name IS NOT NULL "
                f"AND message_index IN ({', '.join('?' * len(chunk))})",
                (session.get_id(), *chunk),
            ):
                if name:
                    out[int(idx)] = str(name)
        return out

    def _replay_history(
        self,
        query: str,
        session: m.Session,
        index: SessionIndex,
        limit: int,
        wanted: Callable[[int], bool],
    ) -> list[RetrievedEntry]:
        """Tier 3 of a replay's turn: the session's in-memory index (``session_index``).

        ``wanted(message_index)``: which messages may be results (not in the cache, not
        the question or later).
        """
        out = []
        hits = index.search(query, limit, REPLAY_CANDIDATES, bridge_top=REPLAY_BRIDGE_TOP, keep=wanted)
        for hit in hits:
            doc = index.docs[hit.message_index]
            out.append(
                RetrievedEntry(
                    tier=3,
                    score=hit.score,
                    matched_keywords=list(hit.matched_keywords),
                    text=doc.content,
                    session_id=session.key,
                    message_index=hit.message_index,
                    key_hash=key_hash_for(session.key, hit.message_index, doc.content),
                    role=index.roles[hit.message_index],
                )
            )
        return out

    def _big_session_search(self, session: m.Session) -> dict[str, Any]:
        """Tier-3 options of a replay's turn on a session too big for ``session_index``.

        The store ranks only its own best ``BIG_SESSION_SEARCH`` matches (FTS5 bm25 or
        ts_rank_cd order); on SQLite the session's average length is followed
        incrementally (``_fts_avg_len``) instead of read whole at every turn.
        """
        self._require_history_index()
        options: dict[str, Any] = dict(BIG_SESSION_SEARCH)
        if self.store.is_sqlite:
            avg = self._fts_avg_len(session.get_id())
            if avg is not None:
                options["session_avg_len"] = avg
        return options

    def _fts_avg_len(self, session_id: int) -> float | None:
        """``search_sqlite._session_avg_len`` of a session, read incrementally (same value).

        Keeps (last message id, messages seen, indexed rows, token total) per session and
        reads only the newer rows' docsize records; a count mismatch (rows deleted by
        another writer) starts over from the whole session. Dropped with the indexes
        when a turn rolls back (``_forget_replay_state``).
        """
        from kvcache_cli.store.search_sqlite import FTS_TABLE, _varints

        state = self._fts_len
        sid = int(session_id)
        for _attempt in range(2):
            (count,) = self.store.query("SELECT count(*) FROM messages WHERE session_id = ?", (sid,))[0]
            last_id, seen, rows, total = state.get(sid, (0, 0, 0, 0))
            new = self.store.query(
                f"SELECT m.id, d.sz FROM messages AS m LEFT JOIN {FTS_TABLE}_docsize AS d ON d.id = m.id "
                "WHERE m.session_id = ? AND m.id > ? ORDER BY m.id",
                (sid, last_id),
            )
            if seen + len(new) != count:
                state.pop(sid, None)
                continue
            for mid, blob in new:
                last_id = mid
                if blob is None:
                    continue
                rows += 1
                vals = _varints(bytes(blob), 2)
                if len(vals) == 2:
                    total += vals[1]
            state[sid] = (last_id, count, rows, total)
            return total / rows if rows and total > 0 else 1.0
        return None  # could not follow the session: the search reads it itself

    def _forget_replay_state(self) -> None:
        """A turn rolled back: drop what the replay kept from inside it."""
        self._indexes.forget()
        self._fts_len.clear()

    def _require_history_index(self) -> None:
        if not self.index_history:
            raise StoreError("this store keeps no full-text index (a parallel replay's scratch store)")

    def _search_history(
        self, query: str, session: m.Session | None, limit: int, **options: Any
    ) -> list[RetrievedEntry]:
        self._require_history_index()
        hits = search.search_messages(self.store, query, session.id if session else None, limit, **options)
        return self._history_entries(
            [(int(h.message_id), h.score, list(h.matched_keywords)) for h in hits], session
        )

    def _semantic_scores(
        self, session_id: int, semantic: tuple[list[float], str]
    ) -> dict[int, tuple[int, float]]:
        """Cosine of the query with every stored vector of the session: index -> (message id, cos)."""
        from kvcache_cli.retrieval.embeddings import semantic_search

        vector, model = semantic
        pairs = semantic_search(self.store, session_id, vector, model, 1 << 30)
        out: dict[int, tuple[int, float]] = {}
        cos_of = dict(pairs)
        ids = list(cos_of)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            for mid, index in self.store.query(
                f"SELECT id, message_index FROM messages WHERE id IN ({', '.join('?' * len(chunk))})",
                chunk,
            ):
                out[int(index)] = (int(mid), cos_of[int(mid)])
        return out

    def _history_entries(
        self, hits: list[tuple[int, float, list[str] | None]], session: m.Session | None, query: str = ""
    ) -> list[RetrievedEntry]:
        """Tier-3 results for ``(message id, score, matched keywords or None)``, in that order."""
        from kvcache_cli.retrieval.textsearch import matched_keywords, query_terms

        if not hits:
            return []
        terms = query_terms(query) if query else []
        ids = [mid for mid, _, _ in hits]
        rows = {
            r[0]: r
            for r in self.store.query(
                "SELECT id, message_index, role, content, session_id FROM messages "
                f"WHERE id IN ({', '.join('?' * len(ids))})",
                ids,
            )
        }
        keys: dict[int, str] = {}
        if session is None:
            sids = sorted({r[4] for r in rows.values()})
            if sids:
                marks = ", ".join("?" * len(sids))
                keys = dict(self.store.query(f"SELECT id, key FROM sessions WHERE id IN ({marks})", sids))
        out = []
        for mid, score, matched in hits:
            row = rows.get(mid)
            if row is None:
                continue
            _, index, role, content, sid = row
            key = session.key if session else keys.get(sid, "?")
            out.append(
                RetrievedEntry(
                    tier=3,
                    score=score,
                    matched_keywords=matched if matched is not None else matched_keywords(terms, content),
                    text=content,
                    session_id=key,
                    message_index=index,
                    key_hash=key_hash_for(key, index, content),
                    role=role,
                )
            )
        return out

    def _after_retrieval(self, session: m.Session, result: RetrievalResult, now: datetime) -> None:
        """Statistics, operation record and engagement (seed: retrieved +0.15, others x0.95)."""
        self._bump_stats(now, total_retrievals=1, entries_retrieved=len(result.entries))
        self._record(
            session.key,
            "retrieve",
            len(result.entries),
            f"Tiers: {result.tiers_searched}, Keywords: {len(result.keywords_used)}",
            now,
        )
        touched = [e.key_hash for e in result.entries if e.session_id == session.key]
        if not touched:
            return
        sid = session.get_id()
        marks = ", ".join("?" * len(touched))
        current = dict(
            self.store.query(
                f"SELECT key_hash, score FROM engagement WHERE session_id = ? AND key_hash IN ({marks})",
                (sid, *touched),
            )
        )
        # scoring.decayed_engagement in SQL; a key already at the 0.1 floor stays there, so only
        # the rows above it are rewritten (most of a long session's keys sit at the floor)
        greatest = "max" if self.store.is_sqlite else "GREATEST"
        self.store.query(
            f"UPDATE engagement SET score = {greatest}(0.1, score * 0.95) "
            f"WHERE session_id = ? AND score > 0.1 AND key_hash NOT IN ({marks})",
            (sid, *touched),
        )
        for key in touched:
            value = next_engagement(current.get(key, 0.3), retrieved=True)
            if key in current:
                self.store.query(
                    "UPDATE engagement SET score = ? WHERE session_id = ? AND key_hash = ?",
                    (value, sid, key),
                )
            else:
                self.store.query(
                    "INSERT INTO engagement (session_id, key_hash, score) VALUES (?, ?, ?)",
                    (sid, key, value),
                )

    def retrieve(
        self,
        session_key: str | None,
        query: str,
        tiers: tuple[int, ...] = (1, 2, 3),
        limit: int = 10,
        min_score: float = 0.0,
    ) -> RetrievalResult:
        """Ranked context for ``query`` from one session's tiers, or every session's history."""
        if limit < 1:
            raise BadInputError("--limit must be at least 1")
        if not tiers or any(t not in (1, 2, 3) for t in tiers):
            raise BadInputError("tiers must be among 1, 2, 3")
        semantic, notice = self._query_embedding(session_key, query)

        def work() -> RetrievalResult:
            now = utcnow()
            if session_key is None:
                from kvcache_cli.retrieval import strategies as st
                from kvcache_cli.retrieval.embeddings import semantic_search

                started = time.perf_counter()
                result = self._new_result(query, semantic, notice)
                strategy = result.strategy
                result.tiers_searched = [3]
                kw = self._search_history(query, None, limit * 2 + 10)
                sem = None
                if semantic is not None:
                    pairs = semantic_search(self.store, None, semantic[0], semantic[1], limit * 2 + 10)
                    sem = self._history_entries(
                        [(mid, st.semantic_score(c), None) for mid, c in pairs], None, query
                    )
                hy = self.config.cache.hybrid
                hits = st.combine(
                    strategy,
                    kw,
                    sem,
                    limit,
                    lambda e: e.score >= min_score,
                    hy.keyword_weight,
                    hy.semantic_weight,
                    self.fusion,
                )
                self._finish_result(result, merge_results(hits, limit), started)
                self._bump_stats(now, total_retrievals=1, entries_retrieved=len(result.entries))
                self._record("*", "retrieve", len(result.entries), "Tiers: [3], all sessions", now)
                return result
            session = self._session_for_update(session_key, create=False, now=now)
            return self._retrieve_in_session(
                session,
                query,
                tiers,
                limit,
                cascade=False,
                exclude_from=None,
                active=None,
                now=now,
                min_score=min_score,
                semantic=semantic,
                notice=notice,
            )

        return self.store.transaction(work)

    def _query_embedding(
        self, session_key: str | None, query: str
    ) -> tuple[tuple[list[float], str] | None, str | None]:
        """The query's vector and model for a semantic strategy, or None and a one-line notice.

        HTTP, so call it outside any transaction. For a one-session query, the session's
        stored messages that lack a vector are embedded first (in batches).
        """
        from kvcache_cli.retrieval import strategies as st

        strategy = self.config.cache.retrieval_strategy
        if not st.needs_semantic(strategy):
            return None, None
        fallback = f"{strategy}: keyword_only used instead"
        if self.llm is None or getattr(self.llm, "_emb_base", True) is None:
            if strategy == "keyword_then_semantic":
                # the default: its keyword stage stands on its own, so no server is no news
                return None, None
            return None, f"retrieval: no embeddings server configured; {fallback}"
        from kvcache_cli.errors import ConfigError, ServerError
        from kvcache_cli.retrieval.embeddings import TurnEmbedder, backfill_session, embed_query
        from kvcache_cli.retrieval.textsearch import query_terms

        if not query.strip() or (not query_terms(query) and not any(ch.isalnum() for ch in query)):
            return None, None  # nothing to search for: empty result, no server call
        try:
            vector, model = embed_query(self.llm, query)
        except (ServerError, ConfigError) as exc:
            return None, f"retrieval: embeddings server failed ({exc}); {fallback}"
        if session_key is not None:
            session = m.Session.get_or_none(m.Session.key == session_key)
            if session is not None:
                notices: list[str] = []
                embedder = TurnEmbedder(self.llm, self.store, notices)
                backfill_session(embedder, session.get_id(), utcnow())
                if embedder.failed:
                    return None, f"retrieval: embeddings server failed ({embedder.failure}); {fallback}"
        return (vector, model), None

    # -------------------------------------------------------------- maintenance and reports
    def maintain(
        self,
        dry_run: bool = False,
        inactive_hours: float | None = None,
        check: bool = False,
    ) -> MaintenanceResult:
        """Release idle sessions' caches and snapshots, prune snapshots, trim history."""
        from kvcache_cli.services.maintain import maintain

        return maintain(self, dry_run, inactive_hours, check)

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check`` (SQLite) or ``ok`` when PostgreSQL answers."""
        from kvcache_cli.services.maintain import integrity_check

        return integrity_check(self.store)

    def statistics(self, session_key: str | None = None, history: int = 10) -> dict[str, Any]:
        """The seed's statistics export, the session states and recent operations."""
        from kvcache_cli.services.stats import statistics

        return statistics(self, session_key, history)

    def session_state(self, session: Any, capacity: int | None = None) -> dict[str, Any]:
        """The seed's ``SessionCacheState`` plus the persisted extras."""
        from kvcache_cli.services.stats import session_state

        return session_state(self, session, capacity)

    def session_detail(self, session: m.Session) -> dict[str, Any]:
        """One session's snapshots, summary and cache usage turn by turn."""
        from kvcache_cli.services.stats import session_detail

        return session_detail(self, session)
