"""The upstream's context size (``n_ctx``): asked at start and, while unknown, again.

A ``serve`` started before its upstream (or while the model still loads) does not
know the slots' size, and turns use ``[model] n_ctx`` meanwhile. :class:`UpstreamContext`
asks again on a chat turn, at most once every ``RETRY_SECONDS``, and keeps the first
size the upstream gives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvcache_cli.server.upstream import UpstreamError

RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class ContextProbe:
    """What asking the upstream found: the smallest slot ``n_ctx`` (None: unknown), the
    slot count, where it came from (``/slots`` or ``/props``), and, when unknown, why
    (``unreachable``, ``loading``, or ``""``: it answers without saying)."""

    n_ctx: int | None
    slots: int = 0
    source: str = ""
    failure: str = ""


def _size(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def probe_n_ctx(upstream: Any) -> ContextProbe:
    """Ask ``GET /slots``, else ``GET /props`` (llama-server's), once each, no retries."""
    slots = upstream.get_json("/slots")
    if isinstance(slots, list) and slots:
        sizes = [_size(s.get("n_ctx")) if isinstance(s, dict) else None for s in slots]
        known = [n for n in sizes if n is not None]
        if len(known) == len(slots):
            return ContextProbe(min(known), len(known), "/slots")
    props = upstream.get_json("/props")
    if isinstance(props, dict):
        n_ctx = _size((props.get("default_generation_settings") or {}).get("n_ctx"))
        if n_ctx is not None:
            return ContextProbe(n_ctx, _size(props.get("total_slots")) or 1, "/props")
    return ContextProbe(None, failure=_why_unknown(upstream))


def _why_unknown(upstream: Any) -> str:
    try:
        upstream.forward("GET", "/health", None)
    except UpstreamError as exc:
        if exc.reason in ("unreachable", "timeout"):
            return "unreachable"
        return "loading" if exc.status == 503 else ""
    return ""


class UpstreamContext:
    """The upstream's ``n_ctx`` as far as known (thread-safe)."""

    def __init__(
        self,
        upstream: Any,
        n_ctx: int | None,
        retry_seconds: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.n_ctx = n_ctx
        self._upstream = upstream
        self._retry = retry_seconds
        self._clock = clock
        self._next = 0.0  # the first chat turn asks at once
        self._asking = threading.Lock()

    def current(self) -> tuple[int | None, ContextProbe | None]:
        """(the ``n_ctx`` known now, the probe that just learned it or None). While it is
        unknown, asks the upstream when the last ask is ``retry_seconds`` old; one thread
        asks, the others go on without waiting for it."""
        if self.n_ctx is not None or self._clock() < self._next:
            return self.n_ctx, None
        if not self._asking.acquire(blocking=False):
            return self.n_ctx, None
        try:
            if self.n_ctx is not None or self._clock() < self._next:
                return self.n_ctx, None
            probe = probe_n_ctx(self._upstream)
            self._next = self._clock() + self._retry
            self.n_ctx = probe.n_ctx
            return self.n_ctx, probe if probe.n_ctx is not None else None
        finally:
            self._asking.release()
