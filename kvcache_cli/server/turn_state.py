"""A chat turn's state: the turn in progress, what the route sends back, an error answer.

Plain data shared by ``serving_chat`` (which fills them) and ``api_server`` (which
sends them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kvcache_cli.engine.entries import ChatMessage
from kvcache_cli.server.protocol import ChatCompletionRequest
from kvcache_cli.services import chat_turn
from kvcache_cli.store.live_history import HistoryTail


class ServeError(Exception):
    """An answer that is an error: ``status`` and the OpenAI-style ``body``."""

    def __init__(self, status: int, body: dict[str, Any], reason: str = "") -> None:
        super().__init__(reason or body.get("error", {}).get("message", ""))
        self.status = status
        self.body = body
        self.reason = reason
        self.log: dict[str, Any] = {}  # facts for the request's log line (session, notices)


@dataclass
class TurnResult:
    """What the route sends back: a JSON body, or a stream of events; plus headers.

    A JSON body comes with ``after``: the rest of the turn (the vectors of its messages)
    and the release of the session, which the caller must run once the body is sent
    (or failed to be). A stream does the same when it ends.
    """

    headers: dict[str, str]
    body: dict[str, Any] | None = None
    stream: Iterator[bytes] | None = None
    log: dict[str, Any] = field(default_factory=dict)  # facts for the request's log line
    after: Callable[[], None] | None = None


@dataclass
class Turn:
    """One turn in progress (shared by the stages of ``ChatService``)."""

    request: ChatCompletionRequest
    raw: list[dict[str, Any]]  # the client's messages as sent
    messages: list[ChatMessage]  # the same, normalised as stored
    capacity: int
    key: str = ""
    kind: str = "new"
    branched_from: str | None = None
    common: int = 0  # messages shared with the stored history
    tail: HistoryTail | None = None  # the session's stored tail when the turn began (None: new)
    plan: chat_turn.TurnPlan | None = None
    prompt: list[dict[str, Any]] = field(default_factory=list)
    estimate: int = 0
    bounded: bool = False  # ``estimate`` is the byte bound, not a count
    dropped: int = 0
    retried: bool = False
    started: float = field(default_factory=time.perf_counter)
    upstream_s: float = 0.0
    traced: bool = False
    sent_at: float = 0.0  # when the prompt first went upstream
    log: dict[str, Any] = field(default_factory=dict)  # the request's log line (filled as it goes)
    branch_release: Callable[[], None] | None = None
    write_reply: Callable[[], bool] | None = None  # a JSON answer's reply, stored once it is sent
    pending_trace: dict[str, Any] | None = None  # its trace record, written after that
    notices: list[str] = field(default_factory=list)  # the core's notices (a summary fell back...)
