"""Texts longer than the embedding model's input limit are cut to fit, never a lost run.

all-MiniLM on llama-server answers 500 "input (N tokens) is too large" past 512 tokens;
the fake server does the same at ``embedding_max_tokens``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from kvcache_cli.config import Config
from kvcache_cli.errors import ServerError
from kvcache_cli.llm.client import LLMClient, LLMSettings
from kvcache_cli.loaders import load_file
from kvcache_cli.retrieval.embeddings import MAX_EMBED_UNITS, _clip, embed_texts
from kvcache_cli.services.manager import KVCacheManager
from kvcache_cli.store.backend import open_store
from tests.fake_llama_server import FakeLlamaServer

LONG = " ".join(f"w{i % 10}" for i in range(700))  # 700 words: 1,400 characters, 700+ tokens


def _nonspace(text: str) -> int:
    return sum(1 for ch in text if not ch.isspace())


def test_clip_keeps_at_most_the_units_a_512_token_model_takes() -> None:
    assert _clip("short text") == "short text"
    for text in ("東" * 2000, "a " * 1000, "1,2;3." * 300, LONG):
        cut = _clip(text)
        assert text.startswith(cut)
        assert _nonspace(cut) == MAX_EMBED_UNITS  # WordPiece: tokens <= non-space characters


def _vectorless(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(
            conn.execute(
                "SELECT count(*) FROM messages m LEFT JOIN embeddings e ON e.message_id = m.id"
                " WHERE e.id IS NULL"
            ).fetchone()[0]
        )


def _process(tmp_path: Path, server: FakeLlamaServer, strategy: str) -> KVCacheManager:
    conv = tmp_path / "c.json"
    turns = [
        "Where did you hike?",
        f"Alice: {LONG}",
        "Any photos of the lake?",
        "Bob: yes, the lake at dawn.",
    ]
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    conv.write_text(json.dumps({"session_id": "s", "messages": msgs}))
    config = Config()
    config.cache.retrieval_strategy = strategy
    manager = KVCacheManager(
        open_store(str(tmp_path / "kv.db")), config, LLMClient(LLMSettings(base_url=server.url, retries=0))
    )
    for c in load_file(conv):
        manager.process_conversation(c, "s")
    return manager


def test_a_message_over_512_tokens_is_embedded_not_the_run_lost(tmp_path: Path) -> None:
    with FakeLlamaServer(embeddings=True) as server:  # the real model's limit: 512 tokens
        manager = _process(tmp_path, server, "semantic_only")
        try:
            assert not [n for n in manager.notices if "embeddings" in n]
            assert _vectorless(tmp_path / "kv.db") == 0
            res = manager.retrieve("s", LONG, (3,), 2)  # a query over the limit too
            assert res.strategy == "semantic_only" and not res.notices
            assert res.entries[0].message_index == 1
        finally:
            manager.store.close()
        sent = [t for r in server.requests if r.path == "/v1/embeddings" for t in r.body["input"]]
        assert sent and max(map(_nonspace, sent)) == MAX_EMBED_UNITS  # cut before sending


def test_a_server_with_a_smaller_limit_gets_shorter_cuts(tmp_path: Path) -> None:
    with FakeLlamaServer(embeddings=True, embedding_max_tokens=64) as server:
        manager = _process(tmp_path, server, "semantic_only")
        try:
            assert not [n for n in manager.notices if "embeddings" in n]
            assert _vectorless(tmp_path / "kv.db") == 0
        finally:
            manager.store.close()
        llm = LLMClient(LLMSettings(base_url=server.url, retries=0))
        batch = embed_texts(llm, ["short one", LONG, "another short one"])
        assert len(batch.vectors) == 3 and batch.dim == 384


def test_other_server_errors_still_fail() -> None:
    with FakeLlamaServer(embeddings=False) as server:
        llm = LLMClient(LLMSettings(base_url=server.url, retries=0))
        with pytest.raises(ServerError, match="--embeddings"):
            embed_texts(llm, [LONG])
