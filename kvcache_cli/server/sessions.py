"""Which stored session a request continues, and one lock per session.

A request names its session with the ``X-Session-Id`` header (refused unless it is a
valid id), else the body's ``user`` field (any label: see :func:`session_id_for_user`);
else kvcache looks for a recently active stored session whose history the request
extends (the prefix rule of ``process``); else it starts a new session. Against
the session's stored history, a request is one of:

- ``extend``: it holds the whole stored history and more (a normal turn; also the
  retry of a turn whose reply never came: nothing new to store);
- ``regenerate``: the stored history up to its last user message, without the reply
  that followed (the stored reply is replaced);
- ``branch``: it differs from the stored history earlier (an edited message): a new
  session, branched from the common prefix. Its id (:func:`edit_key`) is named by the
  history up to the edit point only, so the edited conversation's later turns, sent
  under the original id, find and continue that same branch.

Telling them apart needs the stored history, but not every turn needs to read it:
:class:`KnownHistories` remembers, per session, a digest of the history this process
stored last and where the store's history ended then. While the store's tail (one
indexed query) is still that one, the request is compared with the digest; only
otherwise (another process wrote the session, or the request differs) are the stored
messages read.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvcache_cli.engine.entries import ChatMessage
from kvcache_cli.errors import BadInputError
from kvcache_cli.store import live_history
from kvcache_cli.store.backend import Store
from kvcache_cli.store.live_history import HistoryTail

SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
PREFIX_CANDIDATES = 64  # recently active sessions compared against a request without an id


def validate_session_id(value: str, where: str) -> str:
    """A session id from a client: 1 to 128 of ``A-Z a-z 0-9 . _ : @ -``, not starting
    with punctuation (it may end up in a slot file name)."""
    if not SESSION_ID_RE.fullmatch(value):
        raise BadInputError(
            f"{where}: a session id is 1 to 128 characters of letters, digits and . _ : @ - "
            "(starting with a letter or digit)"
        )
    return value


def session_id_for_user(user: str) -> str:
    """The session of a request's ``user`` field: the value itself when it is a valid
    session id, else one derived from it (``user-`` and 24 hex digits of its SHA-256):
    OpenAI clients send any end-user label there ("John Smith", an e-mail address)."""
    if SESSION_ID_RE.fullmatch(user):
        return user
    return "user-" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def new_session_id() -> str:
    return "serve-" + secrets.token_hex(8)


@dataclass
class Match:
    """How a request relates to a stored session (see the module docstring)."""

    kind: str  # new | extend | regenerate | branch
    session_key: str
    common: int = 0  # messages the request shares with the stored history
    stored: int = 0  # messages the session stores


def classify(
    stored: list[tuple[str, str]], stored_total: int, messages: list[ChatMessage], key: str
) -> Match:
    """Compare a request's messages with a session's stored ``(role, content)`` prefix
    (``stored`` holds at least ``len(messages) + 1`` rows when the session has them)."""
    if stored_total == 0:
        return Match("new", key)
    common = 0
    for (role, content), msg in zip(stored, messages, strict=False):
        if role != msg.role or content != msg.content:
            break
        common += 1
    n = len(messages)
    if common == stored_total:
        return Match("extend", key, common, stored_total)
    if common == n and n < stored_total and stored[n][0] == "assistant" and stored_total == n + 1:
        return Match("regenerate", key, common, stored_total)
    return Match("branch", key, common, stored_total)


def find_by_prefix(store: Store, messages: list[ChatMessage]) -> str | None:
    """The recently active session whose stored history the request extends (or
    regenerates) the most of; None when none does.

    Compares the last stored message of each of the ``PREFIX_CANDIDATES`` most
    recently active sessions first, and the whole prefix only for those that match.
    """
    n = len(messages)
    best: tuple[int, str] | None = None
    for key, total in live_history.recent_sessions(store, PREFIX_CANDIDATES):
        if total == 0 or total > n + 1:
            continue
        probe = total - 1 if total <= n else n - 1  # regenerate: compare the last user message
        if live_history.message_at(store, key, probe) != (messages[probe].role, messages[probe].content):
            continue
        if best is None or total > best[0]:
            best = (total, str(key))
    return best[1] if best else None


def edit_key(parent: str, messages: Sequence[ChatMessage], common: int) -> str:
    """The id of the branch an edited history continues in: ``<parent>.edit-<digest>``,
    the digest over the history up to the edit point: the ``common`` messages shared
    with ``parent`` and the first that differs, unless that one is a reply (an edit of
    what the model said, or a history that ends before the stored one diverges: the
    branch's next turns bring a reply there that differs again). Messages after the
    edit point do not count, so every later turn of the edited conversation maps to
    the same branch instead of starting another one."""
    point = common + 1 if common < len(messages) and messages[common].role != "assistant" else common
    return f"{parent[:100]}.edit-{history_digest(messages[:point])[:12]}"


def _digest_bytes(messages: Sequence[ChatMessage]) -> bytes:
    """What :func:`history_digest` hashes: each message's role and text, each ended by NUL."""
    return "".join(f"{m.role}\0{m.content}\0" for m in messages).encode("utf-8", "surrogatepass")


def history_digest(messages: Sequence[ChatMessage]) -> str:
    """A digest of the messages' roles and texts, in order."""
    return hashlib.sha256(_digest_bytes(messages)).hexdigest()


def history_digests(messages: Sequence[ChatMessage]) -> tuple[str, str]:
    """(:func:`history_digest` of all but the last message, of all of them), in one pass."""
    h = hashlib.sha256(_digest_bytes(messages[:-1]))
    before_last = h.hexdigest()
    h.update(_digest_bytes(messages[-1:]))
    return before_last, h.hexdigest()


@dataclass(frozen=True)
class KnownHistory:
    """A session's history as this process stored it last: the store's tail then, and
    digests of the stored messages (all of them, and all but the last)."""

    tail: HistoryTail
    digest: str
    before_last: str


class KnownHistories:
    """What :class:`KnownHistory` each recently served session has (thread-safe; the
    ``limit`` most recently remembered are kept). Used under the session's lock."""

    def __init__(self, limit: int) -> None:
        self._known: OrderedDict[str, KnownHistory] = OrderedDict()
        self._limit = limit
        self._guard = threading.Lock()

    def match(self, key: str, tail: HistoryTail | None, messages: list[ChatMessage]) -> Match | None:
        """The request's :class:`Match` when the store's ``tail`` is the one remembered
        (the stored history is then the remembered one); None: compare stored messages."""
        with self._guard:
            known = self._known.get(key)
        if known is None or tail is None or tail.last is None or not known.tail.same_history(tail):
            return None
        n, count = len(messages), tail.count
        if n >= count and history_digest(messages[:count]) == known.digest:
            return Match("extend", key, count, count)
        if n == count - 1 and tail.last[0] == "assistant" and history_digest(messages) == known.before_last:
            return Match("regenerate", key, n, count)
        return None

    def remember(self, key: str, tail: HistoryTail, stored: list[ChatMessage]) -> None:
        """``stored`` is now the session's whole stored history (``tail``: the session
        as read before the turn, for its id and creation time)."""
        last = (stored[-1].role, stored[-1].content)
        now = HistoryTail(tail.session_id, tail.created_at, tail.metadata, len(stored), last)
        before_last, digest = history_digests(stored)
        known = KnownHistory(now, digest, before_last)
        with self._guard:
            self._known.pop(key, None)
            self._known[key] = known
            while len(self._known) > self._limit:
                self._known.popitem(last=False)

    def forget(self, key: str) -> None:
        with self._guard:
            self._known.pop(key, None)


class SessionLocks:
    """One lock per session: a session's turns never interleave.

    In one process, a ``threading.Lock`` per session key (released by whichever thread
    finishes the turn: a streamed turn ends on another thread). On PostgreSQL, also a
    session-level advisory lock on a connection of its own, so two ``serve`` processes
    sharing a store never interleave a session's turns either.
    """

    def __init__(self, store: Store, pg_url: str | None = None) -> None:
        self._store = store
        self._pg_url = pg_url if not store.is_sqlite else None
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # key -> (lock, turns using it)
        self._guard = threading.Condition()  # guards the table and the count; told when idle
        self._held = 0

    @property
    def in_progress(self) -> int:
        """Turns in progress: sessions whose lock is taken (a JSON answer's turn holds it
        until its reply and vectors are stored, after the answer went out)."""
        return self._held

    def __len__(self) -> int:
        """Sessions with a lock in memory: those a turn holds or waits for."""
        return len(self._locks)

    def _enter(self, key: str) -> threading.Lock:
        """The session's lock, counted as in use (a lock no turn uses is dropped, so a
        server that runs for days does not keep one per session it ever saw)."""
        with self._guard:
            lock, users = self._locks.get(key) or (threading.Lock(), 0)
            self._locks[key] = (lock, users + 1)
            return lock

    def _leave(self, key: str, was_held: bool) -> None:
        with self._guard:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
            if was_held:
                self._held -= 1
                if not self._held:
                    self._guard.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until no turn holds a session; whether none does."""
        with self._guard:
            return self._guard.wait_for(lambda: not self._held, timeout)

    def acquire(self, key: str, timeout: float) -> Any:
        """Take the session's lock (waiting up to ``timeout`` s); returns a release
        callable, or None when it stayed busy."""
        deadline = time.monotonic() + timeout
        lock = self._enter(key)
        if not lock.acquire(timeout=timeout):
            self._leave(key, was_held=False)
            return None
        conn = None
        if self._pg_url:
            try:
                conn = self._advisory(key, max(0.0, deadline - time.monotonic()))
            finally:
                if conn is None:  # it failed, or another host held the session all along
                    lock.release()
                    self._leave(key, was_held=False)
            if conn is None:
                return None
        with self._guard:
            self._held += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()  # closing the connection releases its advisory lock
            lock.release()
            self._leave(key, was_held=True)

        return release

    def _advisory(self, key: str, timeout: float) -> Any:
        """The session's advisory lock on a connection of its own (None: still held by
        another host after ``timeout`` seconds; ``lock_timeout`` bounds the wait)."""
        import psycopg2
        import psycopg2.errors

        number = int.from_bytes(
            hashlib.sha256(b"kvcache-serve:" + key.encode()).digest()[:8], "big", signed=True
        )
        conn = psycopg2.connect(self._pg_url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT set_config('lock_timeout', %s, false)", (f"{max(1, int(timeout * 1000))}ms",)
                )
                cur.execute("SELECT pg_advisory_lock(%s)", (number,))
        except psycopg2.errors.LockNotAvailable:
            conn.close()
            return None
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def held(self, key: str, timeout: float) -> Iterator[bool]:
        release = self.acquire(key, timeout)
        try:
            yield release is not None
        finally:
            if release is not None:
                release()
