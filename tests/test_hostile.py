"""Issue 5.5: hostile text, generated slot names, owner-only files, no leaked API keys."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from kvcache_cli.llm.client import make_slot_filename
from kvcache_cli.services.manager import KVCacheManager
from kvcache_cli.store.backend import open_store
from tests.fake_llama_server import FakeLlamaServer
from tests.helpers import connect, invoke, write_json

HOSTILE = [
    'tell me about "unbalanced quote',
    "alpha AND OR NOT beta NEAR(gamma delta) col:value ^start prefix* * -minus +plus",
    "'; DROP TABLE messages; -- and \" OR 1=1 --",
    "robert'); DELETE FROM sessions WHERE ('1'='1",
    "bell\x07 tab\t escape\x1b[31m red\x1b[0m null\x00byte del\x7f end",
    "x" * 100_000 + " longtoken",
    "مرحبا بالعالم \u202eevil.exe\u202c שלום עולם kvcache",
    "C++ node.js e.g. 100% HTTP/2 #42 kv-cache x86-64 foo:bar don't",
    "🙂🔥 emoji zwj 👨‍👩‍👧 and combining é",
]


def test_hostile_text_is_stored_and_searched_as_plain_text(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = tmp_path / "kv.db"
    msgs = []
    for i, text in enumerate(HOSTILE):
        msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": f"reply number {i}"}]
    src = write_json(
        tmp_path / "h.json",
        {"session_id": "hostile'; DROP TABLE sessions;--", "messages": msgs},
        compact=True,
    )
    done = invoke("-q", "--db", str(db), "process", str(src), home=home)
    assert done.returncode == 0, done.stderr
    conn = connect(db)
    try:
        stored = [r[0] for r in conn.execute("SELECT content FROM messages ORDER BY message_index")]
        assert stored == [m["content"] for m in msgs]  # byte for byte, control characters included
        assert conn.execute("SELECT key FROM sessions").fetchall() == [("hostile'; DROP TABLE sessions;--",)]
    finally:
        conn.close()
    store = open_store(str(db))
    try:
        manager = KVCacheManager(store)
        for text in HOSTILE + ["*", '"', "AND", "NEAR(", ")", "'", "\x00", "", " ", "-", ":"]:
            manager.retrieve("hostile'; DROP TABLE sessions;--", text)
            manager.retrieve(None, text)
    finally:
        store.close()
    found = invoke(
        "--db", str(db), "retrieve", "hostile'; DROP TABLE sessions;--", HOSTILE[1], "--json", home=home
    )
    assert found.returncode == 0 and "Traceback" not in found.stderr, found.stderr
    hits = invoke("--db", str(db), "retrieve", "--all-sessions", "DROP TABLE messages", "--json", home=home)
    texts = [r["text"] for r in json.loads(hits.stdout)["results"]]
    assert HOSTILE[2] in texts
    long_hit = invoke("--db", str(db), "retrieve", "--all-sessions", "longtoken", "--json", home=home)
    assert any(r["text"].endswith("longtoken") for r in json.loads(long_hit.stdout)["results"])
    rtl = invoke("--db", str(db), "retrieve", "--all-sessions", "שלום", "--json", home=home)
    assert any("שלום" in r["text"] for r in json.loads(rtl.stdout)["results"])
    conn = connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (len(msgs),)
    finally:
        conn.close()


@pytest.mark.parametrize(
    "session",
    [
        "../../etc/passwd",
        "a/b\\c",
        "..",
        ".hidden",
        "x\x00y",
        "מפגש\u202e",
        "con",
        "a" * 300,
        "$(rm -rf ~)",
        " ",
    ],
)
def test_slot_file_names_are_generated_not_taken_from_input(session: str) -> None:
    name = make_slot_filename(session, "../" + session)
    assert re.fullmatch(r"kvcache-[0-9a-f]{16}-\d{8}T\d{6}Z-[0-9a-f]{8}(-[A-Za-z0-9]{1,24})?\.bin", name), (
        name
    )
    assert "/" not in name and ".." not in name


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_kvcache_creates_are_owner_only(tmp_path: Path) -> None:
    home = tmp_path / "home"
    # kvcache creates only its default location (an explicit --db folder must exist)
    data_home = {"KVCACHE_HOME": str(tmp_path / "new" / "deeper")}
    db = tmp_path / "new" / "deeper" / "kvcache.db"
    src = write_json(
        tmp_path / "c.json",
        {"session_id": "s", "messages": [{"role": "user", "content": "hi?"}]},
        compact=True,
    )
    old = os.umask(0o022)
    try:
        assert invoke("-q", "process", str(src), home=home, env=data_home).returncode == 0
        assert invoke("-q", "maintain", home=home, env=data_home).returncode == 0
        assert invoke("-q", "process", str(src), home=home).returncode == 0  # the default store under home
        assert invoke("init-config", home=home).returncode == 0
    finally:
        os.umask(old)
    assert _mode(db) == 0o600
    assert _mode(db.parent) == 0o700 and _mode(db.parent.parent) == 0o700
    assert _mode(Path(f"{db}.maintain.lock")) == 0o600
    for path in home.rglob("*"):
        assert _mode(path) & 0o077 == 0, (path, oct(_mode(path)))
    # while a connection is open SQLite keeps -wal/-shm beside the db: same mode as the db
    import sqlite3

    conn = sqlite3.connect(str(db))
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("SELECT count(*) FROM messages").fetchone()
    try:
        for suffix in ("-wal", "-shm"):
            side = Path(f"{db}{suffix}")
            if side.exists():
                assert _mode(side) == 0o600, (suffix, oct(_mode(side)))
    finally:
        conn.close()


SECRET = "sk-test-5f2b9c0e7d1a4b8c9e6f3a2d1c0b9a87"


def test_api_keys_never_appear_in_output_or_errors(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = tmp_path / "kv.db"
    config = tmp_path / "kvcache.toml"
    config.write_text('[llm]\napi_key_env = "KV_TEST_API_KEY"\n')
    src = write_json(
        tmp_path / "c.json",
        {"session_id": "s", "messages": [{"role": "user", "content": f"what is {i}?"} for i in range(3)]},
        compact=True,
    )
    outputs = []

    def run(*args: str) -> None:
        outputs.append(
            invoke(
                "-vv",
                "--db",
                str(db),
                "--config",
                str(config),
                *args,
                home=home,
                env={"KV_TEST_API_KEY": SECRET},
            )
        )

    with FakeLlamaServer(api_key="the-right-key") as server:  # our key is wrong: 401 everywhere
        run("process", "--server", server.url, str(src))
        run("stats", "--server", server.url, "--json")
        run("snapshot", "s", "--slot", "0", "--server", server.url)
        run("clear", "s", "--slot", "0", "--server", server.url)
    run("process", "--server", "http://127.0.0.1:9", str(src))
    outputs.append(invoke("-vv", "--db", f"postgresql://user:{SECRET}@127.0.0.1:9/kv", "stats", home=home))
    assert any(o.returncode != 0 for o in outputs)
    for out in outputs:
        assert SECRET not in out.stdout and SECRET not in out.stderr, out.stderr[:300]
        assert SECRET[:12] not in out.stderr
    for path in home.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET.encode() not in db.read_bytes()
