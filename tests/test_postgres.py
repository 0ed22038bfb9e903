"""PostgreSQL as the second backend: same JSON as SQLite, concurrency, locks, copy-store.

The PostgreSQL cases need ``KVCACHE_TEST_PG_URL`` (``.ci/run`` starts a server and
sets it); without it they are skipped. The driver-missing and password cases need
no server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.helpers import EXAMPLES, WALL_CLOCK_KEYS, cli_env, invoke, kvcache_command, run_kvcache
from tests.pg import pg_url  # noqa: F401  (fixture)

CONVERSATIONS = [EXAMPLES / "support-chat.json", EXAMPLES / "sharegpt.json"]
MASKED = WALL_CLOCK_KEYS | {"database", "db", "store", "location", "path", "backend", "last_cleared_at"}


def _mask(value: Any) -> Any:
    """``value`` without wall-clock times, durations and the store's location."""
    if isinstance(value, dict):
        return {
            k: ("<masked>" if (k in MASKED or k.endswith("_ms") or k.endswith("_seconds")) else _mask(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return value


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return home


def _json(home: Path, db: str, *args: str) -> Any:
    rc, out, err = invoke(*args, "--json", home=home, db=db)
    assert rc == 0, (args, err)
    return json.loads(out)


def _scenario(home: Path, db: str) -> dict[str, Any]:
    """Every command once, in a fixed order; their JSON, masked."""
    out: dict[str, Any] = {}
    out["process"] = _json(home, db, "process", *map(str, CONVERSATIONS))
    out["retrieve"] = _json(home, db, "retrieve", "support-4821", "refund for the damaged order")
    out["retrieve_when"] = _json(
        home, db, "retrieve", "support-4821", "When did Tomás move the backfill job?"
    )
    out["retrieve_all"] = _json(home, db, "retrieve", "--all-sessions", "python list comprehension error")
    out["retrieve_tiers"] = _json(home, db, "retrieve", "--tiers", "1,2", "support-4821", "backfill order")
    out["snapshot"] = _json(home, db, "snapshot", "support-4821")
    out["snapshots"] = _json(home, db, "snapshot", "--list")
    snap_id = out["snapshot"]["id"]
    out["restore"] = _json(home, db, "restore", "support-4821", str(snap_id))
    out["clear"] = _json(home, db, "clear", "support-4821")
    out["maintain_dry"] = _json(home, db, "maintain", "--dry-run", "--inactive-hours", "0")
    out["maintain"] = _json(home, db, "maintain", "--inactive-hours", "0", "--check")
    out["stats"] = _json(home, db, "stats", "--history", "50")
    out["stats_session"] = _json(home, db, "stats", "support-4821")
    return _mask(out)


@pytest.mark.slow
@pytest.mark.usefixtures("pg_url")
def test_every_command_gives_the_same_json_on_both_backends(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    home = _home(tmp_path)
    sqlite = _scenario(home, str(tmp_path / "kv.db"))
    postgres = _scenario(home, pg_url)
    for step in sqlite:
        assert postgres[step] == sqlite[step], step


def test_search_index_ranks_identically(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    from kvcache_cli.config import Config
    from kvcache_cli.loaders import load_file
    from kvcache_cli.services.manager import KVCacheManager
    from kvcache_cli.store import search
    from kvcache_cli.store.backend import open_store

    queries = [
        "refund for the damaged order",
        "When did Tomás move the backfill job?",
        "python error",
        "what when",
        "",
    ]
    results: list[list[Any]] = []
    for url in (str(tmp_path / "kv.db"), pg_url):
        store = open_store(url)
        try:
            manager = KVCacheManager(store, Config())
            for conv in load_file(CONVERSATIONS[0]):
                manager.process_conversation(conv, conv.session_key or "support-4821")
            sid = store.db.execute_sql(
                "SELECT id FROM sessions WHERE key = " + store.db.param, ("support-4821",)
            ).fetchone()[0]
            got = []
            for q in queries:
                for scope in (sid, None):
                    hits = search.search_messages(store, q, scope, 8)
                    got.append(
                        [(h.message_index, round(h.raw_score, 9), h.score, h.matched_keywords) for h in hits]
                    )
            results.append(got)
        finally:
            store.close()
    assert results[0] == results[1]
    assert any(results[0])


NASTY = [
    "don't",
    "C++",
    "e.g.",
    "node.js",
    "100%",
    "HTTP/2",
    "#42",
    "why?",
    'say "hi',
    "AND then",
    "OR",
    "NOT this",
    "*",
    "kv-cache",
    "x86-64",
    "foo:bar",
    "a & b | !c",
    "'quoted'",
    "back\\slash",
    "<-> :* ()",
    "ünïcödé café",
    "日本語のテキスト",
    "🙂🙂",
    "x" * 3000,
    "' | '",
    "NEAR(a b)",
]


def test_any_query_is_safe_on_postgres(pg_url: str) -> None:  # noqa: F811
    from kvcache_cli.store import search
    from kvcache_cli.store.backend import open_store

    store = open_store(pg_url)
    try:
        rows = [
            (i, "café kv-cache node.js C++ x86-64 foo:bar don't 100% HTTP/2 #42 日本語のテキスト")
            for i in range(3)
        ]
        store.db.execute_sql(
            "INSERT INTO sessions (key, created_at, last_activity, conversation_count, turn_count, "
            "cache_size_bytes, capacity_bytes, entry_count, total_clears, metadata) "
            "VALUES ('s', now(), now(), 0, 0, 0, 0, 0, 0, '{}')"
        )
        for i, text in rows:
            store.db.execute_sql(
                "INSERT INTO messages (session_id, message_index, role, content, tokens, importance) "
                "VALUES (1, %s, 'user', %s, 1, 0.5)",
                (i, text),
            )
        search.index_messages(store, [(i + 1, 1, text) for i, text in rows])
        for query in NASTY:
            for scope in (1, None):
                hits = search.search_messages(store, query, scope, 5)
                assert all(0.0 <= h.score <= 1.0 for h in hits)
        assert search.search_messages(store, "kv-cache", 1, 5)
        assert search.search_messages(store, "CAFE", None, 5)
    finally:
        store.close()


@pytest.mark.slow
def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    home = _home(tmp_path)
    reference = str(tmp_path / "ref.db")
    for conv in CONVERSATIONS:
        rc, _, err = run_kvcache("process", str(conv), home=home, db=reference)
        assert rc == 0, err
    # six processes at once on a store that does not exist yet: each file three times
    command = kvcache_command() + ["--db", pg_url, "process"]
    procs = [
        subprocess.Popen(
            command + [str(conv)],
            env=cli_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
        for conv in CONVERSATIONS
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err

    def counts(db: str) -> dict[str, Any]:
        from kvcache_cli.store.backend import open_store

        store = open_store(db)
        try:
            q = store.db.execute_sql
            return {
                "sessions": q("SELECT key, turn_count FROM sessions ORDER BY key").fetchall(),
                "messages": q(
                    "SELECT count(*), count(DISTINCT CAST(session_id AS TEXT) || '-' || "
                    "CAST(message_index AS TEXT)) FROM messages"
                ).fetchone(),
                "turn_log": q("SELECT count(*) FROM turn_log").fetchone(),
                "per_session": q(
                    "SELECT s.key, count(m.id), max(m.message_index) FROM sessions s "
                    "JOIN messages m ON m.session_id = s.id GROUP BY s.key ORDER BY s.key"
                ).fetchall(),
                "migrations": q("SELECT version FROM schema_migrations ORDER BY version").fetchall(),
            }
        finally:
            store.close()

    got, want = counts(pg_url), counts(reference)
    assert [tuple(r) for r in got["sessions"]] == [tuple(r) for r in want["sessions"]]
    assert tuple(got["messages"]) == tuple(want["messages"])
    assert got["messages"][0] == got["messages"][1]  # no duplicate message
    assert tuple(got["turn_log"]) == tuple(want["turn_log"])
    assert [tuple(r) for r in got["per_session"]] == [tuple(r) for r in want["per_session"]]
    assert [tuple(r) for r in got["migrations"]] == [tuple(r) for r in want["migrations"]]
    # the full-text index holds each message once
    from kvcache_cli.store.backend import open_store

    store = open_store(pg_url)
    try:
        n = store.db.execute_sql("SELECT count(*) FROM message_search").fetchone()[0]
        assert n == got["messages"][0]
    finally:
        store.close()


def test_maintain_takes_an_advisory_lock(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    from kvcache_cli.store.backend import open_store

    home = _home(tmp_path)
    rc, _, err = run_kvcache("process", str(CONVERSATIONS[0]), home=home, db=pg_url)
    assert rc == 0, err
    holder = open_store(pg_url)  # another host's maintain, holding the lock
    try:
        with holder.exclusive("maintain"):
            rc, out, err = run_kvcache("maintain", "--inactive-hours", "0", "--json", home=home, db=pg_url)
            assert rc == 0, err
            assert json.loads(out)["skipped"] is True
            assert "another kvcache maintain" in err
        rc, out, err = run_kvcache("maintain", "--inactive-hours", "0", "--json", home=home, db=pg_url)
        assert rc == 0, err
        assert json.loads(out)["sessions_cleaned"] == 1
    finally:
        holder.close()


def _tables(out: str) -> dict[str, tuple[int, str]]:
    data = json.loads(out)
    assert data["verified"] is True
    return {t["table"]: (t["rows"], t["sha256"]) for t in data["tables"]}


def test_copy_store_sqlite_to_postgres_and_back(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    home = _home(tmp_path)
    first, back = str(tmp_path / "first.db"), str(tmp_path / "back.db")
    for conv in CONVERSATIONS:
        assert invoke("process", str(conv), home=home, db=first)[0] == 0
    assert invoke("retrieve", "support-4821", "refund order", home=home, db=first)[0] == 0
    assert invoke("snapshot", "support-4821", home=home, db=first)[0] == 0

    rc, out, err = invoke("copy-store", first, pg_url, "--json", home=home)
    assert rc == 0, err
    there = _tables(out)
    assert there["messages"][0] > 100 and there["snapshot_entries"][0] > 0
    rc, out, err = invoke("copy-store", pg_url, back, "--json", home=home)
    assert rc == 0, err
    assert _tables(out) == there
    # the copies answer the same (the search index was rebuilt on each side)
    answers = [
        _mask(_json(home, db, "retrieve", "support-4821", "When did Tomás move the backfill job?"))
        for db in (first, pg_url, back)
    ]
    assert answers[0] == answers[1] == answers[2]
    # new rows get fresh ids after the copy (sequences moved past the copied ids)
    rc, _, err = invoke("snapshot", "support-4821", home=home, db=pg_url)
    assert rc == 0, err
    # a non-empty destination is refused without --force, replaced with it
    rc, _, err = invoke("copy-store", first, pg_url, home=home)
    assert rc == 2 and "not empty" in err and "--force" in err
    rc, out, err = invoke("copy-store", first, pg_url, "--force", "--json", home=home)
    assert rc == 0, err
    assert _tables(out)["messages"] == there["messages"]  # (the retrievals above changed others)


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def test_wrong_password_is_one_line_without_the_password(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    url = _with_password(pg_url, "Wrong-Secret-42")
    rc, out, err = invoke("stats", home=_home(tmp_path), db=url)
    assert rc == 1
    assert "Wrong-Secret-42" not in err + out
    assert len(err.strip().splitlines()) == 1 and "***" in err


def test_unreachable_server_never_shows_the_password(tmp_path: Path) -> None:
    pytest.importorskip("psycopg2")
    url = "postgresql://kv:Top%40Secret-9@127.0.0.1:1/kvcache?connect_timeout=3"
    rc, out, err = invoke("stats", home=_home(tmp_path), db=url)
    assert rc == 1
    assert "Top" not in err + out and "Secret" not in err + out
    assert err.startswith("kvcache: error:") and len(err.strip().splitlines()) == 1


def test_missing_driver_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['psycopg2'] = None; "
        "sys.argv = ['kvcache', '--db', 'postgresql://kv:Hidden-77@127.0.0.1:5432/kv', 'stats']; "
        "from kvcache_cli.cli.app import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(_home(tmp_path)), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "kvcache: error: PostgreSQL support needs the driver: pip install 'kvcache-cli[postgres]'"
    ]
    assert "Hidden-77" not in proc.stdout + proc.stderr


def test_migrations_are_recorded_once_and_reopen_cleanly(pg_url: str) -> None:  # noqa: F811
    from kvcache_cli.store.backend import open_store
    from kvcache_cli.store.migrations import LATEST_VERSION, migrate

    store = open_store(pg_url)
    try:
        assert migrate(store) == []
        versions = [v for (v,) in store.db.execute_sql("SELECT version FROM schema_migrations").fetchall()]
        assert versions == list(range(1, LATEST_VERSION + 1))
        kinds = dict(
            store.db.execute_sql(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = 'messages' AND column_name IN ('importance', 'timestamp')"
            ).fetchall()
        )
        assert kinds == {"importance": "double precision", "timestamp": "timestamp without time zone"}
    finally:
        store.close()
    open_store(pg_url).close()  # reopening a migrated store raises nothing


@pytest.mark.slow
def test_semantic_and_hybrid_strategies_match_sqlite(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    from tests.fake_llama_server import FakeLlamaServer

    home = _home(tmp_path)
    outputs = []
    with FakeLlamaServer(embedding_dim=64) as server:
        for db in (str(tmp_path / "kv.db"), pg_url):
            out: dict[str, Any] = {}
            out["process"] = _json(home, db, "process", str(CONVERSATIONS[1]), "--server", server.url)
            for strategy in ("semantic_only", "hybrid", "semantic_then_keyword"):
                out[strategy] = _json(
                    home, db, "retrieve", "sharegpt-trip-lisbon", "where should we eat in Lisbon?",
                    "--strategy", strategy, "--server", server.url,
                )  # fmt: skip
            out["stats"] = _json(home, db, "stats")
            outputs.append(_mask(out))
    for step in outputs[0]:
        assert outputs[1][step] == outputs[0][step], step
    assert outputs[0]["semantic_only"]["results"]
