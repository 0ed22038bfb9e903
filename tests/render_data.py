"""A known store for the rendering tests and screenshots: generated conversations, fixed times."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from kvcache_cli.config import Config
from kvcache_cli.engine.entries import ChatMessage
from kvcache_cli.loaders import Conversation

#: The replays' clock: every message is timestamped from here on, a minute apart.
T0 = datetime(2025, 3, 14, 9, 0, 0)
#: The "now" the insights are computed against in the tests.
NOW = datetime(2025, 3, 14, 15, 0, 0)

TOPICS = [
    "the nginx reverse proxy returns 502 after the upgrade",
    "postgres replication lag on the reporting replica",
    "a python script that rotates the api keys nightly",
    "the kubernetes pod keeps restarting with OOMKilled",
    "billing export to csv drops rows with unicode names",
    "redis eviction policy for the session cache",
]


def small_config(n_ctx: int = 1024, clear_after: int = 6) -> Config:
    """Small capacity so both memory and turn-limit clears happen in a short replay."""
    config = Config()
    config.model.n_ctx = n_ctx
    config.model.layers = 4
    config.model.kv_heads = 2
    config.model.head_dim = 64
    config.cache.clear_after_conversations = clear_after
    config.cache.retrieval_enabled = True
    return config


def conversation(
    key: str,
    turns: int,
    seed: int,
    start: datetime = T0,
    long_every: int = 0,
    size: int = 25,
    minutes: int = 10,
) -> Conversation:
    """``turns`` user/assistant pairs, deterministic; every ``long_every``-th turn is long."""
    rng = random.Random(seed)
    messages = [ChatMessage(role="system", content="You are a helpful support engineer.", timestamp=start)]
    for turn in range(turns):
        topic = TOPICS[rng.randrange(len(TOPICS))]
        n = size if not (long_every and turn % long_every == long_every - 1) else 10 * size
        words = " ".join(rng.choice(topic.split()) for _ in range(n))
        when = start + timedelta(minutes=minutes * turn + 1)
        ask = "Can you recall what we did" if turn % 4 == 3 else "Next"
        mark = "?" if turn % 4 == 3 else "."
        question = f"Turn {turn + 1}: {ask} about {topic}{mark} {words}"
        messages.append(ChatMessage(role="user", content=question, timestamp=when))
        answer = f"For {topic}: check the logs, then the config. " + " ".join(
            rng.choice(topic.split()) for _ in range(n // 2)
        )
        messages.append(ChatMessage(role="assistant", content=answer, timestamp=when + timedelta(seconds=30)))
    return Conversation(session_key=key, messages=messages, place=f"{key}: ")


def build_store(path: Path, config: Config | None = None) -> tuple[Any, list[Any]]:
    """Four sessions of different shapes in a fresh SQLite store; returns (store, results)."""
    from kvcache_cli.services.manager import KVCacheManager
    from kvcache_cli.store.backend import open_store

    config = config or small_config()
    store = open_store(str(path))
    manager = KVCacheManager(store, config)
    results = [
        manager.process_conversation(conversation("support-long", 30, seed=1, long_every=8), "support-long"),
        manager.process_conversation(
            conversation("billing", 9, seed=2, start=T0 + timedelta(hours=1)), "billing"
        ),
        manager.process_conversation(
            conversation("quick", 2, seed=3, start=T0 + timedelta(hours=2), size=85), "quick"
        ),
        manager.process_conversation(
            conversation("upload", 1, seed=4, start=T0 + timedelta(hours=3), size=230), "upload"
        ),
    ]
    return store, results
