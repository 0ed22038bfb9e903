"""End to end: kvcache commands against real stores (in-process; the script where it matters).

Covers the foundation's acceptance list: the reference clears, two processes replaying
halves, snapshot/restore identity, statistics totals, and every bad input failing with
one line, exit 2 and an unchanged database. The store round trips run on SQLite and on
PostgreSQL (``store_url`` / ``store_factory``; the PostgreSQL variants need
``KVCACHE_TEST_PG_URL``); "unchanged" is a dump of every table on either backend.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvcache_cli.config import Config, load_config
from tests.helpers import (
    EXAMPLES,
    REPO,
    conversation,
    dump_db,
    invoke,
    invoke_json,
    one_error_line,
    run_kvcache,
    strip_wall_clock,
    table_rows,
    truncated,
    write_json,
)
from tests.pg import (  # noqa: F401  (fixtures)
    BACKENDS,
    PG_URL,
    empty_database,
    is_pg,
    release,
    store_factory,
    store_url,
)

ENTRY_COLUMNS = (
    "key_hash, key_data, key_type, value_bytes, layer_index, head_index, importance, "
    "access_count, size_bytes, tokens, message_index, position"
)


def clear_list(session: dict[str, Any]) -> list[tuple[int, str]]:
    return [(c["turn"], c["clear_reason"]) for c in session["clears"]]


def state(db: Path | str, home: Path) -> dict[str, Any]:
    """Everything a replay decides, without wall-clock fields."""
    return {
        "stats": strip_wall_clock(invoke_json("stats", home=home, db=db)),
        "messages": table_rows(
            db,
            "SELECT session_id, message_index, role, content, tokens, timestamp FROM messages ORDER BY 1, 2",
        ),
        "cache": table_rows(
            db, f"SELECT session_id, {ENTRY_COLUMNS} FROM cache_entries ORDER BY 1, position, key_hash"
        ),
        "snapshots": table_rows(
            db,
            "SELECT session_id, turn_index, snapshot_type, reason, state_hash, entry_count "
            "FROM snapshots ORDER BY id",
        ),
        "summary": table_rows(db, "SELECT session_id, text, messages_summarized, clear_count FROM summaries"),
        "turns": table_rows(
            db,
            "SELECT session_id, turn_index, cache_size_bytes, cleared, clear_reason "
            "FROM turn_log ORDER BY 1, 2",
        ),
    }


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    return tmp_path / "kv.db"


# ----------------------------------------------------------------------------- basics
def test_module_entry_point_matches_script(home: Path) -> None:
    rc, out, err = run_kvcache("--help", home=home, module=True)
    assert rc == 0, err
    rc2, out2, _ = invoke("--help", home=home)
    assert rc2 == 0
    for command in ("process", "clear", "retrieve", "snapshot", "restore", "maintain", "stats"):
        assert command in out and command in out2


def test_module_runs_commands_like_the_script(home: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    rc, out, err = run_kvcache("process", EXAMPLES / "sharegpt.json", "--json", home=home, db=a, module=True)
    assert rc == 0, err
    by_module = json.loads(out)
    by_script = invoke_json("process", EXAMPLES / "sharegpt.json", home=home, db=b)
    assert strip_wall_clock(by_module) == strip_wall_clock(by_script)
    rc, _, err = run_kvcache("stats", "nosuch", home=home, db=a, module=True)
    assert rc == 2 and "unknown session 'nosuch'" in one_error_line(err)


def test_examples_process_and_stats(home: Path, store_url: str) -> None:  # noqa: F811
    """The getting-started path: process the examples, then look at stats."""
    db = store_url
    files = [
        EXAMPLES / n for n in ("support-chat.json", "long-messages.json", "sharegpt.json", "openai.jsonl")
    ]
    rc, out, err = invoke("process", *files, home=home, db=db)
    assert rc == 0, err
    assert "support-4821" in out
    data = invoke_json("stats", home=home, db=db)
    keys = {s["session_id"] for s in data["sessions"]}
    assert keys == {
        "support-4821",
        "ha-design-review",
        "sharegpt-rust-lifetimes",
        "sharegpt-trip-lisbon",
        "sharegpt-sql-window",
        "jsonl-onboarding",
        "jsonl-invoice",
    }


def test_readme_first_command_runs(home: Path, tmp_path: Path) -> None:
    """The README's first command (after its install step) works from a fresh folder."""
    import re
    import shlex

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^python3 -m venv .*?\.venv/bin/kvcache (.+)$", readme, re.M)
    assert match, "README lost its first command"
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "examples").symlink_to(EXAMPLES)
    rc, out, err = run_kvcache(*shlex.split(match.group(1)), home=home, cwd=work)
    assert rc == 0, err
    assert "Traceback" not in err
    assert out.strip()
    assert any(p.suffix == ".db" for p in work.iterdir())


def test_default_database_is_private(home: Path) -> None:
    rc, _, err = invoke("process", EXAMPLES / "openai.jsonl", home=home)
    assert rc == 0, err
    path = home / "kvcache.db"
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_db_flag_beats_env(home: Path, tmp_path: Path) -> None:
    env_db, flag_db = tmp_path / "env.db", tmp_path / "flag.db"
    rc, _, err = invoke(
        "--db", flag_db, "process", EXAMPLES / "openai.jsonl", home=home, env={"KVCACHE_DB": str(env_db)}
    )
    assert rc == 0, err
    assert flag_db.exists() and not env_db.exists()
    # a read-only command on a named database that does not exist: a typo, not a new store
    rc, out, err = invoke("stats", "--json", home=home, env={"KVCACHE_DB": str(env_db)})
    assert rc == 2 and "no such database" in err and not env_db.exists()
    rc, _, err = invoke("process", EXAMPLES / "openai.jsonl", home=home, env={"KVCACHE_DB": str(env_db)})
    assert rc == 0, err
    rc, out, err = invoke("stats", "--json", home=home, env={"KVCACHE_DB": str(env_db)})
    assert rc == 0, err
    assert json.loads(out)["database"] == str(env_db)
    assert not (home / "kvcache.db").exists()
    assert stat.S_IMODE(flag_db.stat().st_mode) == 0o600


# ----------------------------------------------------------------------------- clears
def test_short_40_turns_clear_at_16_and_32(home: Path, store_url: str, tmp_path: Path) -> None:  # noqa: F811
    db = store_url
    path = write_json(tmp_path / "short.json", conversation(40, session_id="short"))
    data = invoke_json("process", path, home=home, db=db)
    [session] = data["sessions"]
    assert session["turns_processed"] == 40
    assert clear_list(session) == [(16, "ConversationLimit"), (32, "ConversationLimit")]


def test_long_messages_clear_earlier(home: Path, store_url: str, tmp_path: Path) -> None:  # noqa: F811
    db = store_url
    path = write_json(tmp_path / "long.json", conversation(40, session_id="long", long=True))
    [session] = invoke_json("process", path, home=home, db=db)["sessions"]
    found = clear_list(session)
    assert found and found[0][0] < 16 and found[0][1] == "MemoryThreshold"
    [example] = invoke_json("process", EXAMPLES / "long-messages.json", home=home, db=db)["sessions"]
    assert clear_list(example)[0][1] == "MemoryThreshold" and clear_list(example)[0][0] < 16


def test_turn_details_show_the_bridges(home: Path, store_url: str) -> None:  # noqa: F811
    db = store_url
    data = invoke_json("process", EXAMPLES / "support-chat.json", "--turns", home=home, db=db)
    turns = data["sessions"][0]["turns"]
    assert turns[15]["clear_reason"] == "ConversationLimit"
    assert turns[15]["bridge_messages"][0].startswith(
        "[Memory compressed — conversation summary up to this point:]"
    )
    assert turns[16]["bridge_messages"][0].startswith(
        "[Prior conversation summary — context before memory compression:]"
    )
    detail = invoke_json("stats", "support-4821", home=home, db=db)["session"]
    assert detail["summary"]["clear_count"] == 2


# ----------------------------------------------------------------------------- replays
@pytest.mark.slow
@pytest.mark.parametrize("split", [47, 48], ids=["turn-boundary", "mid-turn"])
def test_two_halves_by_two_processes_equal_one_replay(
    tmp_path: Path,
    home: Path,
    split: int,
    store_factory: Callable[[str], str],  # noqa: F811
) -> None:
    full = json.loads((EXAMPLES / "support-chat.json").read_text(encoding="utf-8"))
    half_path = write_json(tmp_path / "half.json", truncated(full, split))
    full_path = write_json(tmp_path / "full.json", full)
    two, one = store_factory("two"), store_factory("one")
    # three separate processes, as two runs of a user's would be
    first, second, whole = (
        json.loads(run_kvcache("process", path, "--json", home=home, db=db).stdout)["sessions"][0]
        for path, db in ((half_path, two), (full_path, two), (full_path, one))
    )
    assert (
        first["messages_added"] + second["messages_added"] == whole["messages_added"] == len(full["messages"])
    )
    assert clear_list(first) + clear_list(second) == clear_list(whole)
    assert first["usage"] + second["usage"] == whole["usage"]
    assert state(two, home) == state(one, home)


def test_replaying_twice_adds_nothing(home: Path, store_url: str) -> None:  # noqa: F811
    db = store_url
    invoke_json("process", EXAMPLES / "sharegpt.json", home=home, db=db)
    before = dump_db(db)
    again = invoke_json("process", EXAMPLES / "sharegpt.json", home=home, db=db)
    assert [s["messages_added"] for s in again["sessions"]] == [0, 0, 0]
    assert [s["turns_processed"] for s in again["sessions"]] == [0, 0, 0]
    assert dump_db(db) == before


def test_extension_processes_only_new_turns(home: Path, store_url: str, tmp_path: Path) -> None:  # noqa: F811
    db = store_url
    data = conversation(24, session_id="ext")
    write_json(tmp_path / "ext.json", truncated(data, 1 + 2 * 10))
    invoke_json("process", tmp_path / "ext.json", home=home, db=db)
    write_json(tmp_path / "ext.json", data)
    [session] = invoke_json("process", tmp_path / "ext.json", "--turns", home=home, db=db)["sessions"]
    assert session["turns_processed"] == 14
    assert session["messages_added"] == 28
    assert [t["turn"] for t in session["turns"]] == list(range(11, 25))
    assert clear_list(session) == [(16, "ConversationLimit")]


def test_divergent_file_is_refused(home: Path, store_url: str, tmp_path: Path) -> None:  # noqa: F811
    db = store_url
    data = conversation(8, session_id="div")
    invoke_json("process", write_json(tmp_path / "div.json", data), home=home, db=db)
    before = dump_db(db)
    data["messages"][5]["content"] = "rewritten history"
    data["messages"].append({"role": "user", "content": "one more"})
    write_json(tmp_path / "div.json", data)
    rc, _, err = invoke("process", tmp_path / "div.json", home=home, db=db)
    assert rc == 2
    line = one_error_line(err)
    assert "message 5 differs" in line
    assert dump_db(db) == before


# ----------------------------------------------------------------------------- snapshot / stats
def test_snapshot_then_restore_returns_the_same_entries(home: Path, store_url: str) -> None:  # noqa: F811
    db = store_url
    invoke_json("process", EXAMPLES / "openai.jsonl", home=home, db=db)
    snap = invoke_json("snapshot", "jsonl-onboarding", home=home, db=db)
    sql = f"SELECT {ENTRY_COLUMNS} FROM cache_entries WHERE session_id = 1 ORDER BY position, key_hash"
    snap_sql = (
        f"SELECT {ENTRY_COLUMNS} FROM snapshot_entries WHERE snapshot_id = ? ORDER BY position, key_hash"
    )
    active = table_rows(db, sql)
    assert len(active) == snap["entry_count"] == 7
    assert table_rows(db, snap_sql, (snap["id"],)) == active
    cleared = invoke_json("clear", "jsonl-onboarding", home=home, db=db)
    assert cleared["clear_reason"] == "Manual"
    assert len(table_rows(db, sql)) < len(active)
    restored = invoke_json("restore", "jsonl-onboarding", str(snap["id"]), home=home, db=db)
    assert restored["entries_restored"] == 7
    assert table_rows(db, sql) == active
    listed = invoke_json("snapshot", "--list", "jsonl-onboarding", home=home, db=db)["snapshots"]
    assert snap["state_hash"] in [s["state_hash"] for s in listed]


def test_retrieve_and_maintain_round_trip(home: Path, store_url: str) -> None:  # noqa: F811
    """retrieve finds and counts; maintain --dry-run changes nothing; maintain releases."""
    db = store_url
    invoke_json("process", EXAMPLES / "support-chat.json", home=home, db=db)
    found = invoke_json("retrieve", "support-4821", "refund for the damaged order", home=home, db=db)
    assert found["entries_retrieved"] == len(found["results"]) > 0
    assert all(r["session_id"] == "support-4821" for r in found["results"])
    everywhere = invoke_json("retrieve", "--all-sessions", "refund order", home=home, db=db)
    assert everywhere["results"]
    before_stats = invoke_json("stats", home=home, db=db)
    before = dump_db(db)
    dry = invoke_json("maintain", "--dry-run", "--inactive-hours", "0", home=home, db=db)
    assert dry["dry_run"] is True and dry["cleaned_sessions"] == ["support-4821"]
    assert dump_db(db) == before
    done = invoke_json("maintain", "--inactive-hours", "0", "--check", home=home, db=db)
    assert done["sessions_cleaned"] == 1 and done["integrity"] == "ok" and not done["errors"]
    again = invoke_json("maintain", "--inactive-hours", "0", home=home, db=db)
    assert again["sessions_cleaned"] == 0
    stats = invoke_json("stats", home=home, db=db)
    [session] = stats["sessions"]
    assert session["entry_count"] == 0 and session["cache_size_bytes"] == 0
    assert stats["message_count"] == before_stats["message_count"]  # history is kept
    assert invoke_json("stats", "support-4821", home=home, db=db)["session"]["message_count"] == 95


def test_stats_totals_match_process_output(home: Path, store_url: str, tmp_path: Path) -> None:  # noqa: F811
    db = store_url
    reports: list[dict[str, Any]] = []
    reports += invoke_json(
        "process", EXAMPLES / "support-chat.json", EXAMPLES / "sharegpt.json", home=home, db=db
    )["sessions"]
    reports += invoke_json("process", EXAMPLES / "long-messages.json", home=home, db=db)["sessions"]
    write_json(tmp_path / "long.json", conversation(20, session_id="long2", long=True))
    reports += invoke_json("process", tmp_path / "long.json", home=home, db=db)["sessions"]
    stats = invoke_json("stats", home=home, db=db)
    for key in (
        "total_clears",
        "entries_cleared",
        "entries_preserved",
        "total_retrievals",
        "entries_retrieved",
    ):
        assert stats[key] == sum(r[key] for r in reports), key
    assert stats["total_snapshots"] == sum(r["snapshots_created"] for r in reports)
    assert stats["message_count"] == sum(r["messages_added"] for r in reports)
    assert stats["total_clears"] >= 5


# ----------------------------------------------------------------------------- bad input
BAD_FILES: dict[str, tuple[str | None, str]] = {
    "missing": (None, "no such file"),
    "directory": ("<dir>", "is a directory"),
    "invalid-json": (
        '{"messages": [\n  {"role": "user",\n   "content": "hi" oops}]}',
        r":3:\d+: invalid JSON",
    ),
    "no-role": ('[{"content": "hello"}]', "message has no role"),
    "no-content": ('{"session_id": "x", "messages": [{"role": "user"}]}', "message has no content"),
    "unknown-role": ('[{"role": "robot", "content": "beep"}]', "unknown role 'robot'"),
    "bad-jsonl-line": (
        '{"role": "user", "content": "a"}\n{"role": "user", "content": }\n',
        r":2:\d+: invalid JSON",
    ),
    "bad-timestamp": ('[{"role": "user", "content": "a", "timestamp": "yesterday"}]', "not ISO-8601"),
}


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path | str]]:
    """A home and a store (SQLite, then PostgreSQL) holding the JSONL example, shared
    by the bad-input cases."""
    base = tmp_path_factory.mktemp("seeded")
    home = base / "home"
    home.mkdir()
    if request.param == "sqlite":
        db: Path | str = base / "kv.db"
    elif not PG_URL:
        pytest.skip("set KVCACHE_TEST_PG_URL to run the PostgreSQL tests")
    else:
        db = empty_database()
    try:
        invoke_json("process", EXAMPLES / "openai.jsonl", home=home, db=db)
        yield home, db
    finally:
        if isinstance(db, str):
            release(db)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_fails_cleanly(case: str, seeded: tuple[Path, Path | str], tmp_path: Path) -> None:
    import re

    home, db = seeded
    text, expected = BAD_FILES[case]
    suffix = ".jsonl" if case == "bad-jsonl-line" else ".json"
    path = tmp_path / f"{case}{suffix}"
    if text == "<dir>":
        path.mkdir()
    elif text is not None:
        path.write_text(text, encoding="utf-8")
    before = dump_db(db)
    rc, _, err = invoke("process", path, home=home, db=db)
    assert rc == 2
    line = one_error_line(err)
    assert line.startswith("kvcache: error: ")
    assert str(path) in line
    assert re.search(expected, line), line
    assert dump_db(db) == before


def test_bad_file_beside_good_file(home: Path, store_url: str, tmp_path: Path) -> None:  # noqa: F811
    db = store_url
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "user"}]', encoding="utf-8")
    rc, out, err = invoke("process", bad, EXAMPLES / "openai.jsonl", "--json", home=home, db=db)
    assert rc == 2
    assert "bad.json" in one_error_line(err)
    data = json.loads(out)
    assert [s["session_id"] for s in data["sessions"]] == ["jsonl-onboarding", "jsonl-invoice"]
    assert len(data["failed"]) == 1
    assert {r[0] for r in table_rows(db, "SELECT key FROM sessions")} == {"jsonl-onboarding", "jsonl-invoice"}


def test_nul_character_kept_on_sqlite_refused_on_postgres(
    home: Path,
    store_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """SQLite stores text byte for byte; PostgreSQL text cannot hold NUL: one line, exit 2,
    nothing written (not a half-replayed conversation)."""
    invoke_json("process", EXAMPLES / "openai.jsonl", home=home, db=store_url)
    data = conversation(3, session_id="nul")
    data["messages"][3]["content"] = "a NUL\x00 here"
    path = write_json(tmp_path / "nul.json", data)
    before = dump_db(store_url)
    rc, _, err = invoke("process", path, home=home, db=store_url)
    if not is_pg(store_url):
        assert rc == 0, err
        assert table_rows(store_url, "SELECT content FROM messages WHERE content LIKE 'a NUL%'") == [
            ("a NUL\x00 here",)
        ]
        return
    assert rc == 2
    line = one_error_line(err)
    assert str(path) in line and "message 3" in line and "NUL" in line
    assert dump_db(store_url) == before


@pytest.mark.parametrize(
    "args",
    [
        ("stats", "nosuch"),
        ("clear", "nosuch"),
        ("snapshot", "nosuch"),
        ("restore", "nosuch", "1"),
        ("restore", "jsonl-invoice", "9999"),
        ("retrieve", "nosuch", "what was the budget"),
    ],
    ids=lambda a: "-".join(a[:2]),
)
def test_unknown_ids_fail_cleanly(args: tuple[str, ...], seeded: tuple[Path, Path | str]) -> None:
    home, db = seeded
    before = dump_db(db)
    rc, _, err = invoke(*args, home=home, db=db)
    assert rc == 2
    line = one_error_line(err)
    assert "unknown session 'nosuch'" in line or "unknown snapshot 9999" in line
    assert dump_db(db) == before


def test_bad_config_names_key_and_file(home: Path, db: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[cache]\nclear_after_turns = 3\n", encoding="utf-8")
    rc, _, err = invoke("--config", cfg, "stats", home=home, db=db)
    assert rc == 2
    line = one_error_line(err)
    assert str(cfg) in line and "cache.clear_after_turns" in line
    cfg.write_text("[cache]\nmemory_threshold_percent = 1.5\n", encoding="utf-8")
    rc, _, err = invoke("--config", cfg, "stats", home=home, db=db)
    assert rc == 2
    line = one_error_line(err)
    assert str(cfg) in line and "cache.memory_threshold_percent" in line


def test_config_changes_the_clear_limit(home: Path, db: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text("[cache]\nclear_after_conversations = 5\n", encoding="utf-8")
    path = write_json(tmp_path / "c.json", conversation(12, session_id="c"))
    rc, out, err = invoke("--config", cfg, "process", path, "--json", home=home, db=db)
    assert rc == 0, err
    assert clear_list(json.loads(out)["sessions"][0]) == [(5, "ConversationLimit"), (10, "ConversationLimit")]


def test_init_config_writes_a_file_that_loads_back(home: Path, tmp_path: Path) -> None:
    target = tmp_path / "conf" / "kvcache.toml"
    rc, _, err = invoke("init-config", target, home=home)
    assert rc == 0, err
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    loaded = load_config(target)
    assert loaded.to_dict() == Config().to_dict()
    rc, _, err = invoke("init-config", target, home=home)
    assert rc == 2 and "already exists" in one_error_line(err)
    rc, _, err = invoke("init-config", home=home)
    assert rc == 0, err
    assert (home / "kvcache.toml").exists()
    rc, _, err = invoke("stats", home=home)  # the default config file is read and valid
    assert rc == 0, err
    other = tmp_path / "other.toml"
    rc, out, err = invoke("init-config", other, "--json", home=home)
    assert rc == 0, err
    assert json.loads(out) == {"path": str(other), "written": True} and other.exists()


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_retrieve_min_score_out_of_range(home: Path, db: Path, value: str) -> None:
    rc, _, err = invoke("retrieve", "s", "budget", "--min-score", value, home=home, db=db)
    assert rc == 2 and "--min-score must be between 0 and 1" in one_error_line(err)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_unreadable_database_path_is_one_line(home: Path, tmp_path: Path) -> None:
    not_db = tmp_path / "notes.txt"
    not_db.write_text("these are my notes, not a database\n", encoding="utf-8")
    rc, _, err = invoke("stats", home=home, db=not_db)
    assert rc != 0
    assert "not a SQLite database" in one_error_line(err)
    assert not_db.read_text(encoding="utf-8") == "these are my notes, not a database\n"
    _ = os  # keep the import for platform checks
