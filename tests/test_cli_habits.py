"""The command line meets people's habits (issue 17, CLI items), run in-process.

``CliRunner().invoke(app, ...)`` behaves as the ``kvcache`` script: core errors are one
line on stderr with exit code 1 or 2. Subprocesses only where a terminal is needed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kvcache_cli.cli.app import app
from tests.helpers import REPO, copy_sqlite, invoke

EXAMPLES = REPO / "examples"
SUPPORT = EXAMPLES / "support-chat.json"
SUPPORT_SESSION = "support-4821"


def kv(*args: str | Path, code: int = 0) -> Any:
    """Run ``kvcache ARGS`` in-process; check the exit code; return the result."""
    result = CliRunner().invoke(app, [str(a) for a in args], prog_name="kvcache")
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the support-chat example, replayed once per module."""
    base = tmp_path_factory.mktemp("replayed")
    db = base / "kv.db"
    done = invoke("--db", db, "-q", "process", "-j", "1", SUPPORT, home=base / "home")
    assert done.returncode == 0, done.stderr
    return db


@pytest.fixture
def store(replayed: Path, tmp_path: Path) -> Path:
    """A copy of the ``replayed`` store for the test."""
    db = tmp_path / "kv.db"
    copy_sqlite(replayed, db)
    return db


# ----------------------------------------------------------------------- item 1
def test_global_options_work_after_the_command(store: Path) -> None:
    data = json.loads(kv("stats", "--db", store, "--json").stdout)
    assert [s["session_id"] for s in data["sessions"]] == [SUPPORT_SESSION]
    quiet = kv("retrieve", SUPPORT_SESSION, "deadlock", "--db", store, "-q", "--json")
    assert quiet.stderr == "" and json.loads(quiet.stdout)["query"] == "deadlock"
    verbose = kv("retrieve", SUPPORT_SESSION, "deadlock", "--db", store, "-v")
    assert "score" in verbose.stdout


def test_option_after_the_command_wins(store: Path, tmp_path: Path) -> None:
    result = kv("--db", tmp_path / "other.db", "stats", "--db", store, "--json")
    assert json.loads(result.stdout)["session_count"] == 1


def test_config_after_the_command_is_read(store: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache]\nno_such_key = 1\n")
    result = kv("stats", "--db", store, "--config", bad, code=2)
    assert result.stderr.startswith("kvcache: error:") and "no_such_key" in result.stderr


def test_version_and_short_help() -> None:
    from kvcache_cli import __version__

    assert kv("--version").stdout.strip() == f"kvcache {__version__}"
    assert kv("-h").stdout.startswith("Usage: kvcache [OPTIONS] COMMAND")
    assert kv("stats", "-h").stdout.startswith("Usage: kvcache stats")


# ----------------------------------------------------------------------- the edge
def test_core_errors_are_one_line_and_an_exit_code(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    result = kv("--db", missing, "stats", code=2)
    assert result.stderr == f"kvcache: error: {missing}: no such database\n"
    assert result.stdout == ""
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = kv("--db", tmp_path / "kv.db", "process", bad, code=2)
    assert result.stderr.splitlines() == [
        f"kvcache: error: {bad}:1:2: invalid JSON: Expecting property name enclosed in double quotes"
    ]


def test_interrupt_is_exit_130() -> None:
    import typer

    from kvcache_cli.cli.command import run_guarded
    from kvcache_cli.cli.context import CliContext

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as caught:
        run_guarded(CliContext(), interrupted)
    assert caught.value.exit_code == 130


# ----------------------------------------------------------------------- item 4
def test_process_json_failures_are_objects(tmp_path: Path) -> None:
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"role": "user", "content": "hi"}\n{"role": \n')
    no_role = tmp_path / "norole.json"
    no_role.write_text('{"messages": [{"content": "hi"}]}')
    result = kv("--db", tmp_path / "kv.db", "process", bad_line, no_role, "--json", code=2)
    failed = json.loads(result.stdout)["failed"]
    assert failed[0]["file"] == str(bad_line) and failed[0]["place"] == "2:10"
    assert failed[0]["message"].startswith("invalid JSON") and failed[0]["exit_code"] == 2
    assert failed[1] == {
        "file": str(no_role),
        "place": "messages[0]",
        "message": "message has no role",
        "exit_code": 2,
    }


def test_import_summary_is_on_stdout(tmp_path: Path) -> None:
    result = kv("--db", tmp_path / "kv.db", "import", EXAMPLES / "sharegpt.json")
    assert result.stderr == ""
    assert "sharegpt.json" in result.stdout and "messages added" in result.stdout
    data = json.loads(kv("--db", tmp_path / "kv.db", "import", SUPPORT, "--json").stdout)
    assert data["files"][0]["sessions_created"] == 1


def test_json_timestamps_carry_the_time_zone(store: Path) -> None:
    data = json.loads(kv("--db", store, "stats", "--json").stdout)
    stamps = [data["last_operation"], data["insights"]["generated_at"]]
    stamps += [op["timestamp"] for op in data["recent_operations"]]
    stamps += [s["last_activity"] for s in data["sessions"]]
    snapshots = json.loads(kv("--db", store, "snapshot", "--list", "--json").stdout)["snapshots"]
    stamps += [s["created_at"] for s in snapshots]
    assert len(stamps) > 4 and all(stamp.endswith("+00:00") for stamp in stamps), stamps


def test_table_time_columns_say_utc(store: Path) -> None:
    assert "time (UTC)" in kv("--db", store, "stats").stdout
    assert "created (UTC)" in kv("--db", store, "snapshot", "--list").stdout


# ----------------------------------------------------------------------- item 5
@pytest.mark.parametrize(
    ("command", "usage"),
    [
        ("process", "Usage: kvcache process [OPTIONS] FILES..."),
        ("import", "Usage: kvcache import [OPTIONS] FILES..."),
        ("stats", "Usage: kvcache stats [OPTIONS] [SESSION]"),
        ("restore", "Usage: kvcache restore [OPTIONS] SESSION SNAPSHOT"),
        ("clear", "Usage: kvcache clear [OPTIONS] SESSION"),
    ],
)
def test_usage_lines_read_like_the_tool(command: str, usage: str) -> None:
    text = kv(command, "--help").stdout
    assert text.splitlines()[0] == usage
    for typer_spelling in ("{", "<list", "<str>", "<int range>", "<float", "<Path>", "[session]"):
        assert typer_spelling not in text, (command, typer_spelling)


def test_verbose_adds_detail_to_process_and_retrieve(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    plain = kv("--db", db, "process", "-j", "1", SUPPORT).stdout
    verbose = kv("--db", tmp_path / "v.db", "process", "-j", "1", SUPPORT, "-v").stdout
    assert "turns of support-4821" not in plain and "turns of support-4821" in verbose
    short = kv("--db", db, "retrieve", SUPPORT_SESSION, "deadlock").stdout
    detailed = kv("--db", db, "retrieve", SUPPORT_SESSION, "deadlock", "-v").stdout
    assert len(detailed) > len(short) and "#1 tier" in detailed


def test_plurals(store: Path) -> None:
    released = kv("--db", store, "maintain", "--inactive-hours", "0").stdout
    assert "released 1 idle session," in released


def test_restore_age_reads_as_people_say_it() -> None:
    from kvcache_cli.engine.bridge import age_text, restore_bridge

    assert "(633 days old)" in restore_bridge(3, 912193)
    assert [age_text(m) for m in (0, 1, 59, 60, 61, 1440)] == [
        "0 minutes",
        "1 minute",
        "59 minutes",
        "1 hour",
        "1 hour",
        "1 day",
    ]


def test_piped_tables_have_no_trailing_spaces(store: Path) -> None:
    for args in (["stats"], ["stats", SUPPORT_SESSION], ["snapshot", "--list"]):
        out = kv("--db", store, *args).stdout
        assert out.strip(), args
        assert [line for line in out.splitlines() if line != line.rstrip()] == [], args


def complete(args: str, db: Path | None = None) -> list[str]:
    """What bash completion offers for ``kvcache ARGS`` (the last word may be partial)."""
    words = ["kvcache", *(["--db", str(db)] if db else []), *args.split(" ")]
    env = {
        "_KVCACHE_COMPLETE": "complete_bash",
        "COMP_WORDS": " ".join(words),
        "COMP_CWORD": str(len(words) - 1),
    }
    result = CliRunner().invoke(app, [], prog_name="kvcache", env=env)
    return result.stdout.split()


def test_completion_offers_sessions_formats_and_strategies(store: Path) -> None:
    assert complete("clear sup", store) == [SUPPORT_SESSION]
    assert complete("stats ", store) == [SUPPORT_SESSION]
    assert complete("retrieve su", store) == [SUPPORT_SESSION]
    assert complete(f"retrieve {SUPPORT_SESSION} su", store) == []  # the query is not a session
    assert complete("process --format sh") == ["sharegpt"]
    from kvcache_cli.config import RETRIEVAL_STRATEGIES

    assert complete("retrieve --strategy ") == list(RETRIEVAL_STRATEGIES)
    assert complete("retrieve --strategy hy") == ["hybrid"]


def test_public_api_exports_what_the_readme_uses() -> None:
    import kvcache_cli
    from kvcache_cli import BadInputError, ChatMessage, Conversation, KVCacheError, ProcessResult

    assert issubclass(BadInputError, KVCacheError)
    assert {"Conversation", "ChatMessage", "ProcessResult", "KVCacheError"} <= set(kvcache_cli.__all__)
    assert Conversation.__name__ == "Conversation" and ChatMessage.__name__ == "ChatMessage"
    result = ProcessResult("s", "file.json")
    assert [key for key in result.to_dict() if not hasattr(result, key)] == []


# ----------------------------------------------------------------------- item 8
def test_explicit_db_in_a_missing_folder_is_not_created(tmp_path: Path) -> None:
    folder = tmp_path / "nonexistent" / "dir"
    result = kv("--db", folder / "x.db", "process", SUPPORT, code=2)
    assert len(result.stderr.splitlines()) == 1 and "does not exist" in result.stderr
    assert not folder.parent.exists()


def test_default_location_is_created(kvcache_home: Path) -> None:
    home = kvcache_home / "fresh"
    result = CliRunner().invoke(
        app, ["-q", "process", "-j", "1", str(SUPPORT)], env={"KVCACHE_HOME": str(home)}
    )
    assert result.exit_code == 0, result.stderr
    assert (home / "kvcache.db").exists()


# ----------------------------------------------------------------------- item 10
def test_stats_with_the_server_down_still_shows_the_store(store: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # no retries: the default two wait 1.5 s of back-off per run and end the same way
    config = tmp_path / "no-retries.toml"
    config.write_text("[llm]\nretries = 0\n", encoding="utf-8")
    result = kv("--db", store, "--config", config, "stats", "--server", url, "--json", code=1)
    data = json.loads(result.stdout)
    assert data["session_count"] == 1 and data["sessions"][0]["session_id"] == SUPPORT_SESSION
    assert data["server"]["url"] == url and data["server"]["error"]
    assert result.stderr.startswith("kvcache: error:")
    table = kv("--db", store, "--config", config, "stats", "--server", url, code=1)
    assert SUPPORT_SESSION in table.stdout and "kvcache: error:" in table.stderr


# ----------------------------------------------------------------------- item 12
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_stats_watch_redraws_in_place_on_a_small_terminal(store: Path, tmp_path: Path) -> None:
    """On 80x24 the view keeps its top line and fits the screen, redraw after redraw."""
    socket_name = f"kvtest-{uuid.uuid4().hex[:12]}"  # unique: runs of the suite side by side share /tmp
    kvcache = f"env -u COLUMNS -u LINES '{sys.executable}' -m kvcache_cli"
    command = f"{kvcache} --db '{store}' stats --watch 0.3; sleep 30"
    tmux = ["tmux", "-L", socket_name]
    subprocess.run([*tmux, "new-session", "-d", "-x", "80", "-y", "24", command], check=True, timeout=30)
    try:
        screen = ""
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # wait for a few redraws
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p"], capture_output=True, text=True, timeout=30
            ).stdout
            if screen.count("watching every") == 1 and "sessions by cache fill" in screen:
                time.sleep(1.5)
                screen = subprocess.run(
                    [*tmux, "capture-pane", "-p"], capture_output=True, text=True, timeout=30
                ).stdout
                break
            time.sleep(0.3)
        lines = screen.splitlines()
        # it failed twice, unexplained, with an empty screen: say what the pane was running
        fields = "dead=#{pane_dead} status=#{pane_dead_status} cmd=#{pane_current_command}"
        pane = subprocess.run(
            [*tmux, "list-panes", "-F", fields],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert lines and lines[0].startswith("╭─ kvcache"), (screen, pane.stdout, pane.stderr)
        assert screen.count("watching every") == 1, screen
        assert "hidden" in screen, screen  # lower sections dropped to fit 24 lines
    finally:
        subprocess.run([*tmux, "kill-server"], check=False, timeout=30)
