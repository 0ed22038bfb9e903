"""Prometheus metrics of one ``serve`` process, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Requests, latencies, clears, retrievals, slot actions and upstream errors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvcache_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram(
            "kvcache_request_seconds",
            "Time to answer a request (a stream: to its last event)",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.overhead = Histogram(
            "kvcache_turn_overhead_seconds",
            "Time a chat turn spends in kvcache (engine, store, prompt) outside the upstream call",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.clears = Counter("kvcache_clears", "Context clears", ["reason"], registry=r)
        self.retrievals = Counter("kvcache_retrievals", "Turns that added retrieved context", registry=r)
        self.context_retries = Counter(
            "kvcache_context_retries",
            "Upstream context-size errors answered by a clear and one retry",
            registry=r,
        )
        self.slot_actions = Counter(
            "kvcache_slot_actions",
            "Slot saves, restores and restore checks",
            ["action", "result"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "kvcache_upstream_errors", "Failed upstream calls", ["reason"], registry=r
        )
        self.prompt_tokens = Histogram(
            "kvcache_prompt_tokens",
            "Prompt tokens sent upstream per turn",
            buckets=(128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
            registry=r,
        )
        self.cached_share = Gauge(
            "kvcache_last_cached_share",
            "Share of the last prompt the upstream served from its cache",
            registry=r,
        )
        self.sessions_stored = Counter("kvcache_turns_stored", "Chat turns stored", ["kind"], registry=r)
        self.reply_store_errors = Counter(
            "kvcache_reply_store_errors",
            "Replies answered but not stored (a store error; the client's next turn brings them back)",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
