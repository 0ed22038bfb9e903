"""A managed chat turn: session, engine, prompt, upstream call, stored reply, trace.

``ChatService.handle`` answers one ``POST /v1/chat/completions``. It turns every
failure into :class:`ServeError` (status and OpenAI-style body) before anything is
stored when the request is bad; once the turn's messages are stored, an upstream
failure leaves them stored once, so the client's retry continues the same turn.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kvcache_cli.config import Config
from kvcache_cli.engine.entries import ChatMessage
from kvcache_cli.errors import BadInputError, KVCacheError
from kvcache_cli.loaders import parse_message
from kvcache_cli.server import sessions as ses
from kvcache_cli.server.context import TokenBudget, build_prompt, fit_prompt, upstream_prompt_count
from kvcache_cli.server.messages import canonical_calls, normalise
from kvcache_cli.server.metrics import Metrics
from kvcache_cli.server.protocol import ChatCompletionRequest, error_body
from kvcache_cli.server.trace import TraceWriter
from kvcache_cli.server.turn_state import ServeError, Turn, TurnResult
from kvcache_cli.server.upstream import ChatStream, ContextExceededError, Upstream, UpstreamError
from kvcache_cli.server.upstream_context import UpstreamContext
from kvcache_cli.services import chat_turn
from kvcache_cli.store import live_history
from kvcache_cli.store.backend import Store

MANAGERS_KEPT = 256  # sessions whose manager (and retrieval index) stays in memory
DEFAULT_REPLY_RESERVE = 512  # tokens kept free for the reply when the request sets no max_tokens
MAX_EDIT_DEPTH = 8  # branches of branches an edited history may go down


class ChatService:
    """The chat turn logic over one store and one upstream."""

    def __init__(
        self,
        store: Store,
        config: Config,
        upstream: Upstream,
        llm: Any,
        metrics: Metrics,
        *,
        n_ctx: int | None,
        trace: TraceWriter | None = None,
        lock_timeout: float = 300.0,
        default_reserve: int = DEFAULT_REPLY_RESERVE,
        pg_url: str | None = None,
        slots: Any = None,
    ) -> None:
        self.store = store
        self.config = config
        self.upstream = upstream
        self.llm = llm
        self.metrics = metrics
        self.context = UpstreamContext(upstream, n_ctx)  # asked again while unknown
        self.trace = trace
        self.lock_timeout = lock_timeout
        self.default_reserve = default_reserve
        self.locks = ses.SessionLocks(store, pg_url)
        self.budget = TokenBudget(self._count_texts)
        self.slots = slots
        self._managers: dict[str, Any] = {}  # session key -> its manager, oldest first
        self.known = ses.KnownHistories(MANAGERS_KEPT)  # what each session stores (see sessions)
        self._managers_lock = threading.Lock()

    @property
    def n_ctx(self) -> int | None:
        """The upstream's context size per slot, None while it is unknown."""
        return self.context.n_ctx

    # ------------------------------------------------------------------ helpers
    def _count_texts(self, texts: list[str]) -> list[int]:
        if self.llm is not None:
            try:
                return [int(n) for n in self.llm.tokenize(texts)]
            except KVCacheError:
                pass
        return [(len(t) + 2) // 3 for t in texts]  # pessimistic when the upstream cannot count

    def _normalise(self, raw: list[dict[str, Any]]) -> list[ChatMessage]:
        try:
            return normalise(raw)
        except BadInputError as exc:
            raise ServeError(400, error_body(400, str(exc), "invalid_message"), "bad_message") from None

    # ------------------------------------------------------------------ entry point
    def handle(
        self, request: ChatCompletionRequest, body: dict[str, Any], session_hint: str | None
    ) -> TurnResult:
        raw = [m if isinstance(m, dict) else {} for m in body.get("messages", [])]
        messages = self._normalise(raw)
        if not any(m.role == "user" for m in messages):
            raise ServeError(
                400, error_body(400, "messages: a chat turn needs a user message", "no_user_message")
            )
        n_ctx, learned = self.context.current()
        n_ctx = n_ctx or self.config.model.n_ctx
        reserve = request.reply_reserve(min(self.default_reserve, n_ctx // 4))
        capacity = n_ctx - reserve
        if capacity <= 0:
            raise ServeError(
                400,
                error_body(
                    400,
                    f"max_tokens ({reserve}) leaves no room in the upstream context ({n_ctx})",
                    "context_length_exceeded",
                ),
            )
        turn = Turn(request, raw, messages, capacity)
        if learned is not None:
            turn.notices.append(
                f"the upstream's n_ctx is {learned.n_ctx} (from {learned.source}), used from now on"
            )
        self._refuse_oversized(turn)
        if session_hint is not None:
            turn.key = ses.validate_session_id(session_hint, "X-Session-Id")
        elif request.user:
            turn.key = ses.session_id_for_user(request.user)
        else:
            turn.key = ses.find_by_prefix(self.store, messages) or ses.new_session_id()
        release = self.locks.acquire(turn.key, self.lock_timeout)
        if release is None:
            raise ServeError(
                503, error_body(503, f"session {turn.key!r} is busy with another turn", "session_busy")
            )
        try:
            self._classify(turn, release)
            manager = self._manager(turn)
            if turn.kind == "branch" and turn.branched_from is not None:
                chat_turn.branch(manager, turn.branched_from, turn.key, turn.common)
            forced = chat_turn.forced_start(turn.tail.metadata if turn.tail is not None else None)
            turn.plan = chat_turn.begin_turn(manager, turn.key, messages, forced, verified=turn.common)
            turn.notices.extend(turn.plan.notices)
            self._prepare_prompt(turn, manager)
            if self.slots is not None:
                self.slots.before_turn(turn.key, turn.plan)
            if request.stream:
                stream = self._open_stream(turn, manager)
                end = self._ender(turn, manager, release)
                result = TurnResult(self._headers(turn), stream=self._relay(turn, manager, stream, end))
                result.log = self._log_facts(turn)
                release = None  # the stream releases it when it ends
                return result
            answer = self._complete(turn, manager)
            result = TurnResult(self._headers(turn), body=answer, log=self._log_facts(turn))
            result.after = self._ender(turn, manager, release)
            release = None  # ``after`` releases it once the answer is sent
            return result
        except ServeError as exc:
            exc.log.update({"session": turn.key, "notices": turn.notices})
            raise
        finally:
            if release is not None:
                if self.slots is not None:
                    self.slots.release(turn.key)
                self._release_branch(turn)
                release()

    def _ender(self, turn: Turn, manager: Any, release: Callable[[], None]) -> Callable[[], None]:
        """What ends a turn once its answer is out (runs once): a JSON answer's reply is
        stored, then the vectors of the turn's messages (HTTP and a transaction that the
        client need not wait for); then the session's slot and locks are released, so its
        next turn sees them stored."""
        ended = False

        def end() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            try:
                stored = self._write_reply(turn)
                with contextlib.suppress(KVCacheError):
                    chat_turn.add_vectors(manager, turn.key)
                self._take_notices(turn, manager)
                pending, turn.pending_trace = turn.pending_trace, None
                if pending is not None:  # a JSON answer's record: says whether its reply was stored
                    self._write_trace(turn, **pending, stored=stored)
            finally:
                if self.slots is not None:
                    self.slots.release(turn.key)
                self._release_branch(turn)
                release()

        return end

    @staticmethod
    def _take_notices(turn: Turn, manager: Any) -> None:
        """Move the notices the core gave since the turn began (a forced clear's summary,
        the reply's vectors) to the turn's, so they are told with this turn."""
        turn.notices.extend(n for n in manager.notices if n not in turn.notices)
        manager.notices.clear()

    def _write_reply(self, turn: Turn) -> bool:
        """Store a JSON answer's reply (once); whether it was stored (False: there was
        none to write, as for a stream or a regenerate, stored already). The client has the
        answer already, and the session's lock is still held, so its next turn finds the
        reply stored. A failed write is the request's log line's ``error`` and its trace
        record's ``stored: false``; the reply is not lost: the client sends it back with
        its next turn, which stores it as one of that turn's messages (a regenerate's
        reply, which replaces a stored one, is stored before its answer instead)."""
        write, turn.write_reply = turn.write_reply, None
        if write is None:
            return False
        try:
            write()
        except Exception as exc:  # a store error, or a bug: the answer is out either way
            self.metrics.reply_store_errors.inc()
            turn.log.update({"stored": False, "error": f"reply not stored: {exc}"})
            return False
        return True

    def _manager(self, turn: Turn) -> Any:
        """The session's manager: kept between its turns (like one ``process`` run keeps
        one for a file), so its in-memory retrieval index is not rebuilt every turn. Used
        only under the session's lock; dropped after an upstream failure (a manager stops
        asking a server it found down) and when ``MANAGERS_KEPT`` sessions are newer."""
        with self._managers_lock:
            manager = self._managers.pop(turn.key, None)
            if manager is None or manager.capacity() != self._capacity_bytes(turn.capacity):
                manager = chat_turn.manager_for(self.store, self.config, self.llm, turn.capacity)
            self._managers[turn.key] = manager
            while len(self._managers) > MANAGERS_KEPT:
                self._managers.pop(next(iter(self._managers)))
        return manager

    def _capacity_bytes(self, n_ctx: int) -> int:
        from kvcache_cli.engine.memory import capacity_bytes

        return capacity_bytes(self.config.model, self.config.cache, n_ctx)

    def _forget_manager(self, key: str) -> None:
        with self._managers_lock:
            self._managers.pop(key, None)

    def _refuse_oversized(self, turn: Turn) -> None:
        """The system messages and the last user message must fit on their own: refuse
        before storing anything."""
        last_user = max(i for i, m in enumerate(turn.messages) if m.role == "user")
        core = [m for m in turn.raw[:last_user] if m.get("role") in ("system", "developer")]
        core.append(turn.raw[last_user])
        if self.budget.bound(core) <= turn.capacity:
            return  # fits even at one token per byte: no count needed
        need = self.budget.total(core)
        if need > turn.capacity:
            raise ServeError(
                400,
                error_body(
                    400,
                    f"the system messages and the last user message take about {need} tokens; the upstream "
                    f"context holds {turn.capacity} besides the reply",
                    "context_length_exceeded",
                ),
            )

    def _match(self, turn: Turn, key: str) -> ses.Match:
        """How the request relates to session ``key``: from the remembered history while
        the store's tail is unchanged, else by reading the stored messages."""
        turn.tail = tail = live_history.tail(self.store, key)
        if tail is None or tail.count == 0:
            return ses.Match("new", key)
        known = self.known.match(key, tail, turn.messages)
        if known is not None:
            return known
        stored = live_history.first_messages(self.store, tail.session_id, len(turn.messages) + 1)
        return ses.classify(stored, tail.count, turn.messages, key)

    def _classify(self, turn: Turn, release: Callable[[], None]) -> None:
        """new, extend, regenerate, or branch: an edited history continues in a session
        of its own (``sessions.edit_key``: named by the history up to the edit point),
        made from the common prefix unless it exists; the edited conversation's later
        turns, sent under the original id, extend it. An edit of that branch's own history
        goes on in a branch of the branch (``MAX_EDIT_DEPTH`` deep; deeper: 409)."""
        match = self._match(turn, turn.key)
        turn.kind, turn.common = match.kind, match.common
        parent_release, depth = release, 0
        while match.kind == "branch":
            if depth == MAX_EDIT_DEPTH:
                raise ServeError(
                    409, error_body(409, "the edited history conflicts with its branch", "conflict")
                )
            depth += 1
            turn.branched_from = turn.key
            parent_release()
            turn.branch_release = None
            turn.key = ses.edit_key(turn.key, turn.messages, match.common)
            inner = self.locks.acquire(turn.key, self.lock_timeout)
            if inner is None:
                raise ServeError(503, error_body(503, f"session {turn.key!r} is busy", "session_busy"))
            turn.branch_release = parent_release = inner
            match = self._match(turn, turn.key)
            if match.kind == "new":  # the edit's first turn: made from the common prefix
                turn.kind = "branch"
                return
            turn.kind, turn.common = match.kind, match.common  # a later turn, or a retry

    # ------------------------------------------------------------------ prompt
    def _prepare_prompt(self, turn: Turn, manager: Any) -> None:
        assert turn.plan is not None
        if "cleared" in turn.plan.action:
            self.metrics.clears.labels(turn.plan.clear_reason or "unknown").inc()
        prompt = build_prompt(turn.raw, turn.plan)
        bound = self.budget.bound(prompt)
        if bound <= turn.capacity:  # fits even at one token per byte: no count needed
            turn.prompt, turn.estimate, turn.dropped, turn.bounded = prompt, bound, 0, True
            if turn.plan.retrieved:
                self.metrics.retrievals.inc()
            return
        if self.budget.total(prompt) > turn.capacity and "cleared" not in turn.plan.action:
            self._force_clear(turn, manager)
            prompt = build_prompt(turn.raw, turn.plan)
        fitted = fit_prompt(prompt, self.budget, turn.capacity)
        if fitted.tokens > turn.capacity:
            raise ServeError(
                400,
                error_body(400, "the prompt does not fit the upstream context", "context_length_exceeded"),
            )
        turn.prompt, turn.estimate, turn.dropped = fitted.messages, fitted.tokens, fitted.dropped
        turn.bounded = False
        if turn.plan.retrieved:
            self.metrics.retrievals.inc()

    def _force_clear(self, turn: Turn, manager: Any) -> None:
        last_user = max(i for i, m in enumerate(turn.messages) if m.role == "user")
        assert turn.plan is not None
        turn.plan = chat_turn.force_clear(manager, turn.key, last_user, turn.plan)
        self._take_notices(turn, manager)
        chat_turn.record_live(self.store, turn.key, {chat_turn.FORCED_START_KEY: last_user})
        self.metrics.clears.labels(chat_turn.FORCED_CLEAR).inc()

    def _upstream_body(self, turn: Turn) -> dict[str, Any]:
        body = turn.request.model_dump(exclude_unset=True, exclude={"messages", "user"})
        body["messages"] = turn.prompt
        if self.slots is not None:
            body.update(self.slots.request_fields(turn.key))
        return body

    def _on_context_error(self, turn: Turn, manager: Any) -> None:
        """The upstream said the prompt is too long: clear (once) and shrink the estimate."""
        self.metrics.context_retries.inc()
        turn.retried = True
        self.budget.settle()
        self.budget.per_message += 4
        assert turn.plan is not None
        if "cleared" not in turn.plan.action:
            self._force_clear(turn, manager)
        fitted = fit_prompt(build_prompt(turn.raw, turn.plan), self.budget, int(turn.capacity * 0.9))
        turn.prompt, turn.estimate, turn.dropped = fitted.messages, fitted.tokens, fitted.dropped
        turn.bounded = False

    def _call(self, turn: Turn, manager: Any, send: Callable[[dict[str, Any]], Any]) -> Any:
        started = time.perf_counter()
        turn.sent_at = turn.sent_at or started
        try:
            try:
                return send(self._upstream_body(turn))
            except ContextExceededError:
                self._on_context_error(turn, manager)
                return send(self._upstream_body(turn))
        except UpstreamError as exc:
            self.metrics.upstream_errors.labels(exc.reason).inc()
            self._forget_manager(turn.key)
            self._write_trace(turn, status=exc.status, error=exc.reason)
            raise ServeError(exc.status, exc.body, exc.reason) from None
        finally:
            turn.upstream_s += time.perf_counter() - started

    # ------------------------------------------------------------------ answers
    def _complete(self, turn: Turn, manager: Any) -> dict[str, Any]:
        answer: dict[str, Any] = self._call(turn, manager, self.upstream.chat)
        choice = (answer.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        timings, usage = answer.get("timings"), answer.get("usage")
        self._learn(turn, usage)
        reply = self._reply_message(message)
        generated = self._generated(message, choice, usage)
        kept = reply is not None
        if reply is not None:
            facts = self._live_facts(turn, timings, usage)
            if turn.kind == "regenerate":  # replaces the stored reply: not after the answer
                self._store_reply(turn, manager, reply, facts, generated)
            else:  # stored once the answer is out (see ``_ender``)
                turn.write_reply = lambda: self._store_reply(turn, manager, reply, facts, generated)
        answer["kvcache"] = {"session_id": turn.key, "action": self._action(turn), "stored": kept}
        self._after(turn, timings, usage, kept)
        return answer

    def _open_stream(self, turn: Turn, manager: Any) -> ChatStream:
        stream: ChatStream = self._call(turn, manager, self.upstream.chat_stream)
        return stream

    def _relay(
        self, turn: Turn, manager: Any, stream: ChatStream, end: Callable[[], None]
    ) -> Iterator[bytes]:
        """Pass the upstream's events through; store the reply once every event before
        ``[DONE]`` was handed on (a client that goes away stops this generator before
        that), and before ``[DONE]`` itself: a client that has it finds the reply stored.
        ``end`` ends the turn (see ``_ender``) when the generator does."""
        stored = False
        ended = False  # the reply was complete (stored, or not storable)
        finished = False  # every event was handed on (or the upstream's error was)
        try:
            try:
                for event in stream:
                    if stream.done and not ended and stream.finish_reason is not None:
                        ended, stored = True, self._store_streamed(turn, manager, stream)
                    yield event
            except UpstreamError as exc:
                finished = True
                turn.log["error"] = exc.reason
                self.metrics.upstream_errors.labels(exc.reason).inc()
                self._write_trace(turn, status=exc.status, error=exc.reason)
                yield b"data: " + json.dumps(exc.body).encode() + b"\n\n"
                return
            if not ended and stream.finish_reason is not None:  # an upstream that sends no [DONE]
                ended, stored = True, self._store_streamed(turn, manager, stream)
            finished = True
            self._after(turn, stream.timings, stream.usage, stored)
        finally:
            stream.close()
            if not finished and not stored:  # the client went away before the reply was whole
                turn.log["error"] = "client went away"  # the log line's 200 went out with the headers
                self._write_trace(turn, status=499, error="client went away")
            elif not finished:  # gone after its reply was stored: the turn counts
                with contextlib.suppress(KVCacheError):
                    self._after(turn, stream.timings, stream.usage, stored)
            end()

    def _store_streamed(self, turn: Turn, manager: Any, stream: ChatStream) -> bool:
        """Store a finished stream's reply; whether it was stored."""
        self._learn(turn, stream.usage)
        message: dict[str, Any] = {"content": stream.text or None}
        if stream.tool_calls:
            message["tool_calls"] = stream.tool_calls
        if stream.reasoned:
            message["reasoning_content"] = True
        reply = self._reply_message(message)
        if reply is None:
            return False
        generated = self._generated(message, {"finish_reason": stream.finish_reason}, stream.usage)
        facts = self._live_facts(turn, stream.timings, stream.usage)
        return self._store_reply(turn, manager, reply, facts, generated)

    def _reply_message(self, message: dict[str, Any]) -> ChatMessage | None:
        raw = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            raw["tool_calls"] = message["tool_calls"]
        if raw["content"] is None and "tool_calls" not in raw:
            raw["content"] = ""
        try:
            return parse_message(canonical_calls(raw), "reply")
        except BadInputError:
            return None

    def _store_reply(
        self, turn: Turn, manager: Any, reply: ChatMessage, facts: dict[str, Any], generated: int | None
    ) -> bool:
        """Store the reply and the operator's view of the turn (``facts``, see
        ``_live_facts``) in one transaction."""
        if turn.kind == "regenerate":
            chat_turn.replace_reply(manager, turn.key, reply, facts, generated)
        else:
            chat_turn.finish_turn(manager, turn.key, reply, facts, generated)
        if turn.tail is not None:  # a session made by this turn is remembered from its next one
            self.known.remember(turn.key, turn.tail, [*turn.messages, reply])
        self.metrics.sessions_stored.labels(turn.kind).inc()
        return True

    @staticmethod
    def _generated(message: dict[str, Any], choice: dict[str, Any], usage: Any) -> int | None:
        """The reply's token count as the upstream generated it (``usage.completion_tokens``),
        when the stored text is all it generated: plain text, no tool calls, no separate
        reasoning; None: count it. llama-server counts a stop on the end-of-generation
        token too (one more than ``/tokenize`` of the text): an error on the safe side."""
        count = usage.get("completion_tokens") if isinstance(usage, dict) else None
        text = message.get("content")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return None
        if not isinstance(text, str) or not text or message.get("tool_calls"):
            return None
        if message.get("reasoning_content") or choice.get("finish_reason") not in ("stop", "length"):
            return None
        return count

    def _learn(self, turn: Turn, usage: Any) -> None:
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            self.budget.observe(turn.prompt, usage["prompt_tokens"])

    def _after(self, turn: Turn, timings: Any, usage: Any, stored: bool) -> None:
        cached_share = None
        if isinstance(timings, dict) and isinstance(timings.get("prompt_n"), int):
            cache_n = int(timings.get("cache_n") or 0)
            total = cache_n + int(timings["prompt_n"])
            cached_share = cache_n / total if total else None
            if cached_share is not None:
                self.metrics.cached_share.set(cached_share)
        prompt_tokens = upstream_prompt_count(usage, timings)
        self.metrics.prompt_tokens.observe(prompt_tokens or turn.estimate)
        overhead = self._overhead(turn)
        self.metrics.overhead.observe(overhead)
        turn.log.update(
            {
                "prompt_tokens": prompt_tokens,
                "cached": f"{cached_share:.0%}" if cached_share is not None else None,
                "upstream_ms": round(turn.upstream_s * 1000),
                "kvcache_ms": round(overhead * 1000),
                "stored": stored,
                "retried": turn.retried or None,
                "dropped": turn.dropped or None,
            }
        )
        if "tokens" in turn.log:  # a stream's line was begun before its answer was in
            turn.log["tokens"] = self._tokens_fact(turn)
        self._record_live(turn, timings, usage, stored)
        if self.slots is not None:
            self.slots.after_turn(turn.key, timings)
        record = {"status": 200, "timings": timings, "usage": usage, "cached_share": cached_share}
        if turn.write_reply is not None:  # written once the reply's write is done (``_ender``)
            turn.pending_trace = {**record, "kvcache_ms": round(overhead * 1000, 2)}
            return
        self._write_trace(turn, **record, stored=stored)

    @staticmethod
    def _overhead(turn: Turn) -> float:
        """Seconds the turn spent in kvcache: all but the upstream call; for a stream,
        until the prompt went upstream (storing the reply happens after the last event)."""
        if turn.request.stream and turn.sent_at:
            return max(0.0, turn.sent_at - turn.started)
        return max(0.0, time.perf_counter() - turn.started - turn.upstream_s)

    def _live_facts(self, turn: Turn, timings: Any, usage: Any) -> dict[str, Any]:
        """The operator's view of the session after this turn: n_ctx, the last prompt's
        size and cached share, its action and its slot."""
        prompt_tokens = upstream_prompt_count(usage, timings)
        facts: dict[str, Any] = {
            "n_ctx": self.n_ctx,
            "capacity_tokens": turn.capacity,
            "last_prompt_tokens": prompt_tokens if prompt_tokens is not None else turn.estimate,
            "last_cached_tokens": timings.get("cache_n") if isinstance(timings, dict) else None,
            "last_action": self._action(turn),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        }
        if self.slots is not None:
            facts.update(self.slots.facts(turn.key))
        return facts

    def _record_live(self, turn: Turn, timings: Any, usage: Any, stored: bool) -> None:
        """The operator's view in the session's metadata (stored with the reply, else
        here), and in that of the session moved out of a slot for this one."""
        evicted = self.slots.evicted_by(turn.key) if self.slots is not None else None
        try:
            if not stored:
                chat_turn.record_live(self.store, turn.key, self._live_facts(turn, timings, usage))
            if evicted is not None:
                chat_turn.record_live(self.store, evicted, self.slots.facts(evicted))  # type: ignore[union-attr]
        except KVCacheError:
            pass  # the operator's view is best effort: the turn itself is stored

    # ------------------------------------------------------------------ reporting
    def _action(self, turn: Turn) -> str:
        return turn.plan.action if turn.plan is not None else "none"

    def _headers(self, turn: Turn) -> dict[str, str]:
        headers = {
            "X-KVCache-Session": turn.key,
            "X-KVCache-Action": self._action(turn),
            "X-KVCache-Turn": turn.kind,
        }
        if turn.branched_from is not None:
            headers["X-KVCache-Branched-From"] = turn.branched_from
        return headers

    def _log_facts(self, turn: Turn) -> dict[str, Any]:
        """The log line's facts: this dict is completed when the answer is in (a stream's
        line is written when it ends), with the detail ``-v`` shows."""
        turn.log.update(
            {
                "session": turn.key,
                "turn": turn.kind,
                "action": self._action(turn),
                "tokens": self._tokens_fact(turn),
                "notices": turn.notices,  # each on a line of its own (see api_server)
            }
        )
        return turn.log

    @staticmethod
    def _tokens_fact(turn: Turn) -> str:
        """``prompt/capacity``: the upstream's own count once the answer is in, else
        kvcache's count, or ``<=bound`` when the byte bound alone proved the fit."""
        counted = turn.log.get("prompt_tokens")
        if isinstance(counted, int):
            return f"{counted}/{turn.capacity}"
        return f"{'<=' if turn.bounded else ''}{turn.estimate}/{turn.capacity}"

    def _write_trace(self, turn: Turn, **extra: Any) -> None:
        if self.trace is None:
            return
        plan = turn.plan
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "session": turn.key,
            "turn": turn.kind,
            "branched_from": turn.branched_from,
            "action": self._action(turn),
            "clear_reason": plan.clear_reason if plan else None,
            "context_start": plan.context_start if plan else None,
            "retrieved": [i for i, _, _ in plan.retrieved] if plan else [],
            "messages_in_request": len(turn.raw),
            "messages": turn.prompt,
            "prompt_tokens_estimate": turn.estimate,
            "capacity": turn.capacity,
            "dropped": turn.dropped,
            "retried": turn.retried,
            "kvcache_ms": round(self._overhead(turn) * 1000, 2),
            "upstream_ms": round(turn.upstream_s * 1000, 2),
            "notices": list(turn.notices),
        }
        record.update(extra)
        turn.traced = True
        self.trace.write(record)

    def _release_branch(self, turn: Turn) -> None:
        inner, turn.branch_release = turn.branch_release, None
        if inner is not None:
            inner()
