"""The LLM server wired into kvcache: summaries, embeddings, /tokenize, KV slots, stats.

Every CLI case runs kvcache in-process (``tests.helpers.invoke``) against the real local
fake llama-server (tests/fake_llama_server.py), with ``KVCACHE_HOME`` in tmp_path.
"""

from __future__ import annotations

import json
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvcache_cli.llm.client import LLMClient, LLMSettings
from kvcache_cli.retrieval.embeddings import (
    cosine,
    pack_vector,
    semantic_search,
    store_vectors,
    unpack_vector,
)
from kvcache_cli.store import models as m
from kvcache_cli.store.backend import Store, open_store
from kvcache_cli.store.migrations import utcnow
from tests.fake_llama_server import FakeLlamaServer, embed_text
from tests.helpers import CliRun, invoke
from tests.helpers import topic_cycle_conversation as conversation

SECRET = "sk-test-Zq9SECRETvalue"


class Env:
    """A tmp KVCACHE_HOME, a config file and a runner for the installed CLI."""

    def __init__(self, tmp: Path) -> None:
        self.home = tmp / "home"
        self.home.mkdir()
        self.config = tmp / "kvcache.toml"
        self.write_config()
        self.tmp = tmp

    def write_config(self, llm: str = "", extra: str = "") -> None:
        self.config.write_text(
            "[cache]\nclear_after_conversations = 4\n\n"
            '[cache.snapshot]\nstrategy = "none"\n\n'
            f"[llm]\nretries = 0\nbackoff = 0.01\nconnect_timeout = 2.0\nread_timeout = 10.0\n{llm}\n{extra}",
            encoding="utf-8",
        )

    def conv_file(self, data: dict[str, Any], name: str = "conv.json") -> Path:
        path = self.tmp / name
        path.write_text(json.dumps(data), encoding="utf-8")
        return path

    def run(self, *args: str, env: dict[str, str] | None = None) -> CliRun:
        return invoke("--config", str(self.config), *args, home=self.home, env=env)

    def ok(self, *args: str, env: dict[str, str] | None = None) -> Any:
        proc = self.run(*args, env=env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout) if "--json" in args else proc

    def store(self) -> Store:
        return open_store(str(self.home / "kvcache.db"))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture
def slot_server(tmp_path: Path) -> Iterator[FakeLlamaServer]:
    save = tmp_path / "slots"
    save.mkdir()
    with FakeLlamaServer(n_slots=2, n_ctx=4096, slot_save_path=save) as srv:
        yield srv


def posts(srv: FakeLlamaServer) -> int:
    return srv.count("POST")


# ----------------------------------------------------------------------------- process
def test_process_with_server_summaries_embeddings_tokenize(env: Env, slot_server: FakeLlamaServer) -> None:
    env.write_config(llm='embedding_model = "mini"\nembedding_batch_size = 8')
    data = conversation(12)
    path = env.conv_file(data)
    out = env.ok("process", str(path), "--server", slot_server.url, "--json")
    session = out["sessions"][0]
    assert session["total_clears"] == 3
    assert {c["summary_source"] for c in session["clears"]} == {"llm"}

    texts = [msg["content"] for msg in data["messages"]]
    # /tokenize: once per distinct text, never again for a repeated one
    assert slot_server.count("POST", "/tokenize") == len(set(texts)) < len(texts)
    # embeddings: batched (8 per request, looking ahead across turns), all stored
    assert slot_server.count("POST", "/v1/embeddings") == -(-len(texts) // 8)
    assert slot_server.count("POST", "/v1/chat/completions") == 3

    store = env.store()
    try:
        summary = store.bind(m.Summary.select()).get()
        assert summary.source == "llm"
        assert summary.text.startswith("Summary of")
        assert summary.clear_count == 3
        assert summary.token_count > 0
        assert summary.messages_summarized > 0
        rows = list(store.bind(m.Embedding.select().join(m.Message).order_by(m.Message.message_index)))
        assert len(rows) == len(texts)
        assert {(r.model, r.dim) for r in rows} == {("mini", 384)}
        first = rows[0]
        assert len(first.vector) == 384 * 4
        expected = embed_text(texts[0], 384)
        got = unpack_vector(first.vector)
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-6
        # message tokens come from the server's count (+4 template tokens), not the estimate
        msg = store.bind(m.Message.select().where(m.Message.message_index == 1)).get()
        assert msg.tokens == len(slot_server._tokens(texts[1])) + 4
    finally:
        store.close()

    # a second run of the same file asks nothing new (no missing vectors, no new turns)
    slot_server.clear_requests()
    env.ok("process", str(path), "--server", slot_server.url, "--json")
    assert slot_server.count("POST", "/v1/embeddings") == 0
    assert slot_server.count("POST", "/v1/chat/completions") == 0


def test_no_server_call_while_the_write_lock_is_held(env: Env, slot_server: FakeLlamaServer) -> None:
    """Summaries, embeddings and token counts are fetched before each write transaction."""
    db = env.home / "kvcache.db"
    held: list[str] = []
    calls: list[str] = []

    def probe(name: str, handler: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            calls.append(name)
            con = sqlite3.connect(db, timeout=0, isolation_level=None)
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute("ROLLBACK")
            except sqlite3.OperationalError:
                held.append(name)
            finally:
                con.close()
            return handler(*args)

        return wrapper

    for name in ("_chat", "_embeddings", "_tokenize"):
        setattr(slot_server, name, probe(name, getattr(slot_server, name)))
    env.ok("process", str(env.conv_file(conversation(10))), "--server", slot_server.url, "--json")
    cleared = env.ok("clear", "s1", "--server", slot_server.url, "--json")
    assert cleared["summary_source"] == "llm"
    assert calls.count("_chat") == 3  # two clears while processing, one manual
    assert {"_embeddings", "_tokenize"} <= set(calls)
    assert held == []


def test_process_with_server_stopped_falls_back(env: Env, tmp_path: Path) -> None:
    srv = FakeLlamaServer().start()
    url = srv.url
    srv.stop()
    path = env.conv_file(conversation(8))
    proc = env.run("process", str(path), "--server", url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "used the extractive summary instead" in proc.stderr
    assert "connection refused" in proc.stderr
    out = json.loads(proc.stdout)
    assert {c["summary_source"] for c in out["sessions"][0]["clears"]} == {"extractive"}
    assert "Traceback" not in proc.stderr
    store = env.store()
    try:
        summary = store.bind(m.Summary.select()).get()
        assert summary.source == "extractive"
        assert summary.clear_count == 2
        assert summary.token_count > 0
        assert store.bind(m.Embedding.select()).count() == 0
    finally:
        store.close()

    # the server is back: the next run embeds what the first run could not
    with FakeLlamaServer() as back:
        env.ok("process", str(path), "--server", back.url, "--json")
        assert back.count("POST", "/v1/embeddings") >= 1
    store = env.store()
    try:
        assert store.bind(m.Embedding.select()).count() == store.bind(m.Message.select()).count()
    finally:
        store.close()


def test_embeddings_disabled_by_config(env: Env, slot_server: FakeLlamaServer) -> None:
    env.write_config(extra="", llm="")
    env.config.write_text(
        env.config.read_text().replace("[cache]\n", "[cache]\ngenerate_cache_embeddings = false\n")
    )
    env.ok("process", str(env.conv_file(conversation(3))), "--server", slot_server.url, "--json")
    assert slot_server.count("POST", "/v1/embeddings") == 0
    assert slot_server.count("POST", "/tokenize") > 0


def test_embedding_dimension_change_drops_stale_vectors(env: Env, tmp_path: Path) -> None:
    env.write_config(llm='embedding_model = "same-name"')
    with FakeLlamaServer(embedding_dim=384) as first:
        env.ok("process", str(env.conv_file(conversation(3, "a"), "a.json")), "--server", first.url, "--json")
    with FakeLlamaServer(embedding_dim=16) as second:
        proc = env.run("process", str(env.conv_file(conversation(3, "b"), "b.json")), "--server", second.url)
        assert proc.returncode == 0, proc.stderr
        assert "now gives 16-dim vectors (stored: 384-dim)" in proc.stderr
        store = env.store()
        try:
            assert {r.dim for r in store.bind(m.Embedding.select())} == {16}
        finally:
            store.close()
        # session a is re-embedded when it is processed again
        env.ok("process", str(tmp_path / "a.json"), "--server", second.url, "--json")
    store = env.store()
    try:
        assert (
            store.bind(m.Embedding.select().where(m.Embedding.dim == 16)).count()
            == store.bind(m.Message.select()).count()
        )
    finally:
        store.close()


def test_process_slot_sizes_capacity_and_checks_id(env: Env, slot_server: FakeLlamaServer) -> None:
    path = env.conv_file(conversation(2))
    out = env.ok("process", str(path), "--server", slot_server.url, "--slot", "1", "--json")
    assert out["sessions"][0]["capacity_bytes"] == 4096 * 131072
    slot_server.clear_requests()
    proc = env.run("process", str(path), "--server", slot_server.url, "--slot", "7")
    assert proc.returncode == 2
    assert "slot 7 does not exist" in proc.stderr
    assert posts(slot_server) == 0


def test_model_n_ctx_zero_asks_the_server(env: Env, slot_server: FakeLlamaServer) -> None:
    env.write_config(extra="[model]\nn_ctx = 0\n")
    out = env.ok("process", str(env.conv_file(conversation(2))), "--server", slot_server.url, "--json")
    assert out["sessions"][0]["capacity_bytes"] == 4096 * 131072
    assert slot_server.count("GET", "/slots") == 1


# ----------------------------------------------------------------------------- slots
def fill_slot(srv: FakeLlamaServer, slot: int) -> int:
    with LLMClient(LLMSettings(base_url=srv.url)) as client:
        client.chat([{"role": "user", "content": "Remember the kv cache slot test, please."}], slot_id=slot)
    return srv.slot_tokens(slot)


def test_snapshot_clear_restore_slot(env: Env, slot_server: FakeLlamaServer, tmp_path: Path) -> None:
    env.ok("process", str(env.conv_file(conversation(2))), "--json")
    tokens = fill_slot(slot_server, 0)
    assert tokens > 0

    snap = env.ok("snapshot", "s1", "--slot", "0", "--server", slot_server.url, "--json")
    assert snap["slot_id"] == 0
    assert snap["slot_n_saved"] == tokens
    saved = tmp_path / "slots" / snap["slot_filename"]
    assert saved.is_file()
    assert snap["slot_n_written"] == saved.stat().st_size
    assert snap["slot_filename"].startswith("kvcache-") and "/" not in snap["slot_filename"]
    listed = env.ok("snapshot", "--list", "s1", "--json")["snapshots"]
    assert [(s["slot_id"], s["slot_n_saved"]) for s in listed if s["id"] == snap["id"]] == [(0, tokens)]

    cleared = env.ok("clear", "s1", "--slot", "0", "--server", slot_server.url, "--json")
    assert cleared["slot_erased"] == tokens
    assert slot_server.slot_tokens(0) == 0

    restored = env.ok("restore", "s1", str(snap["id"]), "--slot", "0", "--server", slot_server.url, "--json")
    assert restored["slot_n_restored"] == tokens
    assert slot_server.slot_tokens(0) == tokens


def test_slot_out_of_range_refused_before_any_post(env: Env, slot_server: FakeLlamaServer) -> None:
    env.ok("process", str(env.conv_file(conversation(2))), "--json")
    snap = env.ok("snapshot", "s1", "--slot", "0", "--server", slot_server.url, "--json")
    slot_server.clear_requests()
    for args in (
        ("snapshot", "s1", "--slot", "2"),
        ("clear", "s1", "--slot", "5"),
        ("restore", "s1", str(snap["id"]), "--slot", "99"),
    ):
        proc = env.run(*args, "--server", slot_server.url)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "does not exist" in proc.stderr and "slots 0..1" in proc.stderr
    assert posts(slot_server) == 0
    stats = env.ok("stats", "s1", "--json")
    assert stats["total_clears"] == 0  # the refused clear did not happen
    assert len(stats["session"]["snapshots"]) == 1


def test_unknown_session_fails_before_any_slot_request(env: Env, slot_server: FakeLlamaServer) -> None:
    env.ok("process", str(env.conv_file(conversation(1))), "--json")
    for args in (
        ("snapshot", "nope", "--slot", "0"),
        ("clear", "nope", "--slot", "0"),
        ("restore", "nope", "1", "--slot", "0"),
    ):
        proc = env.run(*args, "--server", slot_server.url)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "unknown session 'nope'" in proc.stderr
    assert slot_server.request_count == 0


def test_slot_actions_without_slot_save_path(env: Env) -> None:
    env.ok("process", str(env.conv_file(conversation(1))), "--json")
    with FakeLlamaServer(slot_save_path=None) as srv:
        proc = env.run("snapshot", "s1", "--slot", "0", "--server", srv.url)
        assert proc.returncode == 1
        assert "501" in proc.stderr and "--slot-save-path" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        # the erase is asked first: refused, so the store is not cleared either
        before = env.ok("stats", "s1", "--json")["sessions"][0]
        proc = env.run("clear", "s1", "--slot", "0", "--server", srv.url, "--json")
        assert proc.returncode == 1 and proc.stdout == ""
        assert "--slot-save-path" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert env.ok("stats", "s1", "--json")["sessions"][0] == before
    assert env.ok("snapshot", "--list", "s1", "--json")["snapshots"] == []


def test_restore_slot_needs_a_slot_snapshot(env: Env, slot_server: FakeLlamaServer) -> None:
    env.ok("process", str(env.conv_file(conversation(1))), "--json")
    snap = env.ok("snapshot", "s1", "--json")
    proc = env.run("restore", "s1", str(snap["id"]), "--slot", "0", "--server", slot_server.url)
    assert proc.returncode == 2
    assert "has no slot file" in proc.stderr
    assert posts(slot_server) == 0


def test_stats_shows_slots(env: Env, slot_server: FakeLlamaServer) -> None:
    tokens = fill_slot(slot_server, 1)
    data = env.ok("stats", "--server", slot_server.url, "--json")
    assert data["slots"] == [
        {"id": 0, "n_ctx": 4096, "n_prompt_tokens": None, "is_processing": False},
        {"id": 1, "n_ctx": 4096, "n_prompt_tokens": tokens, "is_processing": False},
    ]
    table = env.ok("stats", "--server", slot_server.url).stdout
    assert "server slots" in table and "cached tokens" in table and str(tokens) in table


def test_stats_with_unreachable_server(env: Env) -> None:
    srv = FakeLlamaServer().start()
    url = srv.url
    srv.stop()
    proc = env.run("stats", "--server", url)
    assert proc.returncode == 1
    assert "connection refused" in proc.stderr
    env.write_config(llm=f'base_url = "{url}"')
    proc = env.run("stats", "--json")  # configured, not asked for: a notice only
    assert proc.returncode == 0, proc.stderr
    assert "slots_error" in json.loads(proc.stdout)


# ----------------------------------------------------------------------------- API key
def test_api_key_sent_and_never_printed(env: Env, tmp_path: Path) -> None:
    save = tmp_path / "slots"
    save.mkdir()
    with FakeLlamaServer(n_ctx=4096, slot_save_path=save, api_key=SECRET) as srv:
        env.write_config(llm=f'base_url = "{srv.url}"\napi_key_env = "KVTEST_LLM_KEY"')
        key_env = {"KVTEST_LLM_KEY": SECRET}
        outputs = []
        proc = env.run("-v", "process", str(env.conv_file(conversation(8))), "--json", env=key_env)
        assert proc.returncode == 0, proc.stderr
        assert {c["summary_source"] for c in json.loads(proc.stdout)["sessions"][0]["clears"]} == {"llm"}
        outputs.append(proc)
        outputs.append(env.run("snapshot", "s1", "--slot", "0", "--json", env=key_env))
        outputs.append(env.run("stats", "s1", "--json", env=key_env))
        outputs.append(env.run("-v", "stats", env=key_env))
        assert all(p.returncode == 0 for p in outputs), [p.stderr for p in outputs]
        assert srv.requests and all(
            r.headers.get("authorization") == f"Bearer {SECRET}" for r in srv.requests
        )
        wrong = env.run("-v", "stats", env={"KVTEST_LLM_KEY": "sk-wrong-Q7key"})
        unset = env.run("stats", "--server", srv.url)
    for proc in outputs:
        assert SECRET not in proc.stdout and SECRET not in proc.stderr
    assert "sk-wrong-Q7key" not in wrong.stdout + wrong.stderr
    assert "401" in wrong.stderr and "API key" in wrong.stderr
    assert unset.returncode == 2 and "KVTEST_LLM_KEY is not set" in unset.stderr


# ----------------------------------------------------------------------------- library
def test_pack_is_float32_little_endian() -> None:
    assert pack_vector([1.0, -2.5]) == struct.pack("<2f", 1.0, -2.5)
    assert list(unpack_vector(pack_vector([0.25, 3.0]))) == [0.25, 3.0]
    with pytest.raises(ValueError):
        unpack_vector(b"\x00\x00\x00")
    assert cosine([1.0, 0.0], [0.0, 0.0]) == 0.0


def test_semantic_search_ranks_by_cosine(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s.db"))
    try:
        now = utcnow()
        a = m.Session(id=store.bind(m.Session.insert(key="a", created_at=now, last_activity=now)).execute())
        b = m.Session(id=store.bind(m.Session.insert(key="b", created_at=now, last_activity=now)).execute())
        vectors = {
            (a.id, 0): [1.0, 0.0, 0.0],
            (a.id, 1): [0.7, 0.7, 0.0],
            (a.id, 2): [0.0, 0.0, 1.0],
            (b.id, 0): [0.9, 0.1, 0.0],
        }
        ids = {}
        for (sid, idx), vec in vectors.items():
            msg_id = store.bind(
                m.Message.insert(session=sid, message_index=idx, role="user", content=f"m{sid}-{idx}")
            ).execute()
            ids[(sid, idx)] = msg_id
            store_vectors(store, "mod", [(msg_id, vec)], now)
        other_id = store.bind(
            m.Message.insert(session=a.id, message_index=3, role="user", content="x")
        ).execute()
        store_vectors(store, "mod", [(other_id, [1.0, 0.0])], now)  # another size: never compared
        store_vectors(store, "other-model", [(other_id, [1.0, 0.0, 0.0])], now)

        hits = semantic_search(store, a.id, [1.0, 0.0, 0.0], "mod", 2)
        assert [h[0] for h in hits] == [ids[(a.id, 0)], ids[(a.id, 1)]]
        assert hits[0][1] == pytest.approx(1.0)
        assert hits[1][1] == pytest.approx(0.7071, abs=1e-3)
        everywhere = semantic_search(store, None, [1.0, 0.0, 0.0], "mod", 10)
        assert [h[0] for h in everywhere][:2] == [ids[(a.id, 0)], ids[(b.id, 0)]]
        assert len(everywhere) == 4
        assert semantic_search(store, a.id, [0.0, 0.0, 0.0], "mod", 5) == []
        assert semantic_search(store, a.id, [1.0, 0.0, 0.0], "none", 5) == []
    finally:
        store.close()


def test_embeddings_url_alone_gives_embeddings_but_no_chat_or_tokenize(
    env: Env, slot_server: FakeLlamaServer
) -> None:
    """[llm].embeddings_url without base_url: vectors are stored, nothing else is asked."""
    env.write_config(llm=f'embeddings_url = "{slot_server.url}"\nembedding_model = "mini"')
    env.ok("process", str(env.conv_file(conversation(10))), "--json")
    store = env.store()
    try:
        assert store.bind(m.Embedding.select()).count() > 0
    finally:
        store.close()
    assert slot_server.count("POST", "/v1/embeddings") > 0
    assert slot_server.count("POST", "/v1/chat/completions") == 0
    assert slot_server.count("POST", "/tokenize") == 0
