"""The default strategy ``auto``: hybrid when an embeddings server is configured, else
keyword_only without a word (issue 18 item 3; chosen by bench/locomo_hybrid_loo.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvcache_cli.config import Config
from kvcache_cli.llm.client import LLMClient, LLMSettings
from kvcache_cli.loaders import load_file
from kvcache_cli.retrieval import strategies as st
from kvcache_cli.services.manager import KVCacheManager
from kvcache_cli.store.backend import open_store
from tests.fake_llama_server import FakeLlamaServer
from tests.helpers import invoke

TURNS = [
    "I adopted a golden retriever puppy named Biscuit last week.",
    "Congratulations! What breed did you say?",
    "I started learning to play the violin in March.",
    "How is it going with the practice?",
    "Slowly. My teacher says my bowing improved a lot.",
    "We are planning a trip to Lisbon for the summer holidays.",
]


def _conversation(path: Path) -> Path:
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(TURNS)]
    path.write_text(json.dumps({"session_id": "chat", "messages": msgs}))
    return path


def _retrieve(home: Path, db: Path, config: Path | None, *args: str) -> tuple[Any, str]:
    env = {"KVCACHE_CONFIG": str(config)} if config else None
    rc, out, err = invoke(
        "retrieve", "chat", "how is the violin practice going", "--json", *args, home=home, db=db, env=env
    )
    assert rc == 0, err
    return json.loads(out), err


def test_defaults_are_auto_with_the_chosen_weights() -> None:
    cache = Config().cache
    assert cache.retrieval_strategy == "auto"
    assert (cache.hybrid.keyword_weight, cache.hybrid.semantic_weight) == (0.7, 0.3)
    assert st.resolve("auto", have_vector=True) == "hybrid"
    assert st.resolve("auto", have_vector=False) == "keyword_only"
    assert st.resolve("hybrid", have_vector=False) == "keyword_only"
    assert st.resolve("keyword_then_semantic", have_vector=True) == "keyword_then_semantic"


def test_retrieve_runs_hybrid_by_default_when_an_embeddings_server_is_configured(tmp_path: Path) -> None:
    home, db = tmp_path / "home", tmp_path / "kv.db"
    rc, _, err = invoke("-q", "import", _conversation(tmp_path / "c.json"), home=home, db=db)
    assert rc == 0, err
    # no server configured: keyword_only, and no notice (the default asked for nothing)
    plain, err = _retrieve(home, db, None)
    assert plain["strategy"] == "keyword_only" and plain["notices"] == [] and err.strip() == ""
    keyword = [r["message_index"] for r in plain["results"]]
    with FakeLlamaServer(embeddings=True) as server:
        config = tmp_path / "kvcache.toml"
        config.write_text(f'[llm]\nembeddings_url = "{server.url}"\n')
        data, err = _retrieve(home, db, config)
        assert data["strategy"] == "hybrid" and data["notices"] == [], err
        got = [r["message_index"] for r in data["results"]]
        # the fused order, not the keyword one: the turn sharing "how is ... going" (stop
        # words for the keyword side) with the question rises to its answer's score, and
        # the answer stays first (issue 18 item 1: answers, not echoes)
        assert got[:2] == [4, 3] and got != keyword
        assert data["results"][1]["score"] > plain["results"][1]["score"]
        assert got == [
            r["message_index"] for r in _retrieve(home, db, config, "--strategy", "hybrid")[0]["results"]
        ]
        assert any("embeddings" in r.path for r in server.requests)


def test_a_processed_turn_uses_the_same_default(tmp_path: Path) -> None:
    """``process`` and ``serve`` turns go through ``retrieve.in_session`` as ``retrieve`` does:
    with the run's embedder the question has a vector, so ``auto`` runs as hybrid."""
    store = open_store(str(tmp_path / "kv.db"))
    try:
        with FakeLlamaServer(embeddings=True) as server:
            manager = KVCacheManager(store, Config(), LLMClient(LLMSettings(base_url=server.url, retries=0)))
            for conv in load_file(_conversation(tmp_path / "c.json")):
                manager.process_conversation(conv, "chat")
            stored = store.db.execute_sql("SELECT count(*) FROM embeddings").fetchone()[0]
            assert stored == len(TURNS)  # the vectors hybrid reads were stored by the replay
            res = manager.retrieve("chat", "how is the violin practice going", (1, 2, 3), 5)
            assert res.strategy == "hybrid" and not res.notices
            assert [e.message_index for e in res.entries[:2]] == [4, 3]  # the answer, then its question
    finally:
        store.close()
