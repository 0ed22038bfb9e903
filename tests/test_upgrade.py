"""Issue 5.6: old schemas are migrated on open; corrupt or foreign files are never overwritten."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

from kvcache_cli.store.migrations import LATEST_VERSION
from tests.helpers import connect, integrity, invoke, write_json

FIXTURE = Path(__file__).parent / "fixtures" / "schema_v1.db"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_schema_v1_store_is_migrated_on_open(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = tmp_path / "old.db"
    shutil.copy(FIXTURE, db)
    conn = connect(db)
    old_messages = conn.execute(
        "SELECT session_id, message_index, role, content FROM messages ORDER BY id"
    ).fetchall()
    assert conn.execute("SELECT version FROM schema_migrations").fetchall() == [(1,)]
    conn.close()

    found = invoke(
        "--db", str(db), "retrieve", "legacy", "RTX 4090 memory", "--tiers", "3", "--json", home=home
    )
    assert found.returncode == 0, found.stderr
    texts = [r["text"] for r in json.loads(found.stdout)["results"]]
    assert any("RTX 4090" in t for t in texts), texts

    conn = connect(db)
    try:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == list(range(1, LATEST_VERSION + 1))
        assert (
            conn.execute(
                "SELECT session_id, message_index, role, content FROM messages ORDER BY id"
            ).fetchall()
            == old_messages
        )
        assert conn.execute("SELECT key, turn_count FROM sessions").fetchall() == [("legacy", 2)]
    finally:
        conn.close()
    assert integrity(db) == "ok"

    # the migrated store keeps working: a replay that extends the old conversation adds only the new turn
    old = [{"role": r, "content": c} for (_s, _i, r, c) in old_messages]
    more = old + [
        {"role": "user", "content": "What cache fits in the rest of the 24 GB?"},
        {"role": "assistant", "content": "About 6 GB."},
    ]
    src = write_json(tmp_path / "legacy.json", {"session_id": "legacy", "messages": more}, compact=True)
    again = invoke("--db", str(db), "process", "--json", str(src), home=home)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["sessions"][0]["messages_added"] == 2
    stats = json.loads(invoke("--db", str(db), "stats", "--json", home=home).stdout)
    assert stats["message_count"] == 6


def test_non_sqlite_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for name, content in (
        ("notes.db", b"these are my notes, not a database\n" * 100),
        ("image.db", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40),
        ("truncated.db", FIXTURE.read_bytes()[:1000]),
        ("garbled.db", FIXTURE.read_bytes()[:100] + b"\xde\xad\xbe\xef" * 5000),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        before = _sha(path)
        for args in (["stats"], ["maintain", "--check"]):
            result = invoke("--db", str(path), *args, home=home)
            assert result.returncode != 0, (name, args)
            lines = result.stderr.strip().splitlines()
            assert (
                len(lines) == 1
                and lines[0].startswith("kvcache: error: ")
                and "Traceback" not in result.stderr
            ), (name, result.stderr)
            assert str(path) in lines[0] or "database" in lines[0], lines[0]
            assert _sha(path) == before, name
        assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


def test_directory_as_db_is_bad_input(tmp_path: Path) -> None:
    result = invoke("--db", str(tmp_path), "stats", home=tmp_path / "home")
    assert result.returncode == 2 and "is a directory" in result.stderr


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    shutil.copy(FIXTURE, db)
    conn = sqlite3.connect(str(db))
    with conn:
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'from the future', '2030-01-01')")
    conn.close()
    result = invoke("--db", str(db), "stats", home=tmp_path / "home")
    assert result.returncode == 1 and "newer than this kvcache understands" in result.stderr


def test_maintain_check_reports_integrity(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = tmp_path / "ok.db"
    shutil.copy(FIXTURE, db)
    result = invoke("--db", str(db), "maintain", "--check", "--json", home=home)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["integrity"] == "ok"
    # damage an index page: the check must report it (exit 1), never crash or rewrite
    conn = sqlite3.connect(str(db))
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'"
    ).fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(db.read_bytes())
    start = (root - 1) * page_size
    data[start + 8 : start + page_size] = b"\x00" * (page_size - 8)
    db.write_bytes(bytes(data))
    bad = invoke("--db", str(db), "maintain", "--check", "--json", home=home)
    assert bad.returncode == 1, (bad.stdout, bad.stderr)
    assert "Traceback" not in bad.stderr
    if bad.stdout.strip():
        assert json.loads(bad.stdout)["integrity"] != "ok"
    else:
        assert len(bad.stderr.strip().splitlines()) == 1
