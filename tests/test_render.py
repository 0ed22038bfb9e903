"""The operator's view: rendered text of ``stats``, ``stats SESSION`` and the replay summary.

A known store is built through the library (generated conversations with fixed
timestamps), rendered on a fixed-width console without a terminal, and checked line by
line; the installed ``kvcache`` is run to check plain output and the ``--json`` keys.
"""

from __future__ import annotations

import io
import json
import os
import pty
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kvcache_cli.cli import render
from kvcache_cli.services import insights
from kvcache_cli.services.manager import KVCacheManager
from tests.helpers import (
    NOW,
    CliRun,
    build_support_store,
    invoke,
    kvcache_command,
    run_kvcache,
    small_config,
    support_conversation,
)

#: The keys ``stats --json`` had before the operator's view; they must stay.
STATS_KEYS = {
    "total_clears",
    "total_retrievals",
    "entries_preserved",
    "entries_cleared",
    "entries_retrieved",
    "active_sessions",
    "last_operation",
    "operation_history_count",
    "total_snapshots",
    "total_restores",
    "snapshot_count",
    "message_count",
    "cache_size_bytes",
    "capacity_bytes",
    "memory_threshold_percent",
    "database",
    "backend",
    "database_size_bytes",
    "sessions",
    "recent_operations",
}


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    path = tmp_path_factory.mktemp("render") / "kv.db"
    store, results = build_support_store(path)
    config = small_config()
    manager = KVCacheManager(store, config)
    view = {
        "path": path,
        "results": results,
        "overview": manager.statistics(None, 5),
        "session": manager.statistics("support-long", 3),
        "insights": insights.compute(store, config, now=NOW),
    }
    store.close()
    yield view


def text_of(renderable: Any) -> list[str]:
    console = Console(width=100, record=True, force_terminal=False, file=io.StringIO())
    console.print(renderable)
    return [line.rstrip() for line in console.export_text().splitlines()]


def line_with(lines: list[str], start: str) -> str:
    found = [line for line in lines if line.startswith(start)]
    assert found, f"no line starts with {start!r} in:\n" + "\n".join(lines)
    return found[0]


# ----------------------------------------------------------------------------- insights
def test_insights_fill_states_and_tops(known: dict[str, Any]) -> None:
    ins = known["insights"]
    assert [(s["session_id"], s["threshold_state"]) for s in ins["sessions_by_fill"]] == [
        ("upload", "over"),
        ("quick", "near"),
        ("billing", "below"),
        ("support-long", "below"),
    ]
    assert ins["threshold_states"] == {"below": 2, "near": 1, "over": 1}
    assert [s["session_id"] for s in ins["top_by_clears"]] == ["support-long", "billing"]
    assert [s["total_clears"] for s in ins["top_by_clears"]] == [7, 1]
    ops = ins["operations_per_hour"]
    assert ops["start"] == "2025-03-13T16:00:00+00:00" and ops["end"] == "2025-03-14T16:00:00+00:00"
    assert ops["series"]["clear"][17:22] == [1, 3, 1, 2, 1]  # 09:00..13:00 on the 14th
    assert ops["totals"]["clear"] == 8 == known["overview"]["total_clears"]
    assert ops["totals"]["restore"] == 0
    assert ins["maintenance"]["keeps_up"] is True


def test_threshold_state_edges() -> None:
    assert insights.threshold_state(0.60, 0.6) == "over"
    assert insights.threshold_state(0.48, 0.6) == "near"
    assert insights.threshold_state(0.47, 0.6) == "below"
    assert insights.threshold_state(0.9, 0.0) == "below"


# ----------------------------------------------------------------------------- stats
def test_stats_overview_text(known: dict[str, Any]) -> None:
    lines = text_of(render.stats_view(known["overview"], known["insights"], 100))
    text = "\n".join(lines)
    # the totals panel is as wide as its title (the database path): compare words
    assert (
        line_with(lines, "│ fill").split()
        == "│ fill 1 over / 1 near / 2 below retrievals 42 snapshots 7 │".split()
    )
    # usage bars sorted by fill, the threshold tick where the bar has not reached it
    rows = [
        "upload        █████████████░░░░░░░   66% over     1.3 MiB      1       0",
        "quick         ██████████░░┆░░░░░░░   51% near     1.0 MiB      2       0",
        "billing       ████████░░░░┆░░░░░░░   38% below  772.0 KiB      9       1",
        "support-long  ███░░░░░░░░░┆░░░░░░░   16% below  318.0 KiB     30       7",
    ]
    positions = [text.index(row) for row in rows]
    assert positions == sorted(positions)
    assert line_with(lines, "┆ memory threshold 60%").endswith("near from 48%")
    # the top sessions, side by side
    assert (
        line_with(lines, "upload          1.3 MiB   66%")
        == "upload          1.3 MiB   66%    support-long       7"
    )
    assert (
        line_with(lines, "quick           1.0 MiB   51%")
        == "quick           1.0 MiB   51%    billing            1"
    )
    # operations per hour: two columns an hour, zero hours dotted, hour labels below
    assert line_with(lines, "clear      ") == (
        "clear      ··································▃▃██▃▃▅▅▃▃····      8       3"
    )
    assert line_with(lines, "restore    ") == "restore    " + "·" * 48 + "      0       0"
    assert line_with(lines, "           16") == "           16          22          04          10"
    assert (
        "maintenance: keeps up; no session idle over 24 h holds cache; history 59 of 10,000 operations"
        in lines
    )


def test_stats_session_text(known: dict[str, Any]) -> None:
    lines = text_of(render.stats_view(known["session"], known["insights"], 100))
    assert lines[1].startswith(
        "│ cache  ██████░░░░░░░░░░░░░░░░░░┆░░░░░░░░░░░░░░░  16% below  318.0 KiB of 2.0 MiB"
    )
    assert line_with(lines, "│ turns    30").startswith(
        "│ turns    30  since clear    1   last clear   2025-03-14 13:41"
    )
    assert "(MemoryThreshold)" in line_with(lines, "│ turns    30")
    assert line_with(lines, "id  type").split() == "id type reason turn entries size age slot file".split()
    assert (
        line_with(lines, " 6  incremental")
        == " 6  incremental  interval    28        9    1.2 MiB  1h 29m  -"
    )
    assert (
        line_with(lines, "summary:") == "summary: 2,385 chars, 7 clears, 58 messages summarized (extractive)"
    )
    marker = line_with(lines, "         0 └")
    assert marker == "         0 └───────────T───M───────M───────M───────M───────M─────────M──"
    assert (
        line_with(lines, "             1 ")
        == "             1         6         11        16        21        26  turn"
    )
    assert "clear 60% ┤" in line_with(lines, " clear 60%")
    assert (
        line_with(lines, "7 clears:")
        == "7 clears: 1 turn limit (turn 6), 6 memory (turns 8, 12, 16, 20, 24, 29)"
    )


def test_panel_titles_are_printed_as_written(known: dict[str, Any]) -> None:
    """A database path or session id with "[x]" or ":smile:" is not read as markup or emoji."""
    overview = {**known["overview"], "database": "/srv/kv[x]/a:smile:.db"}
    assert (
        "kvcache · /srv/kv[x]/a:smile:.db (sqlite,"
        in text_of(render.stats_view(overview, known["insights"], 100))[0]
    )
    state = {**known["session"]["sessions"][0], "session_id": "s[bold]x:smile:"}
    session = {**known["session"], "sessions": [state]}
    assert "session s[bold]x:smile:" in text_of(render.stats_view(session, known["insights"], 100))[0]


def test_process_summary_sawtooth(known: dict[str, Any]) -> None:
    result = known["results"][0]
    lines = text_of(render.process_view(result, 0.6, 100))
    assert line_with(lines, "   30  ").split() == [
        "30",
        "61/61",
        "7",
        "6",
        "30",
        str(result.to_dict()["entries_retrieved"]),
    ]
    assert line_with(lines, "   6  ConversationLimit").split()[:3] == ["6", "ConversationLimit", "1.2"]
    assert line_with(lines, "cache usage by turn:") == (
        "cache usage by turn: peak 1.8 MiB of 2.0 MiB, clear at 60% (1.2 MiB); T turn limit, M memory"
    )
    # the same sawtooth as stats SESSION draws from the turn log
    session_lines = text_of(render.stats_view(known["session"], known["insights"], 100))
    chart = [line for line in lines if "┤" in line or "│" in line[:13] or "└" in line]
    session_chart = [line for line in session_lines if "┤" in line or "│" in line[:13] or "└" in line]
    assert chart == [line for line in session_chart if not line.startswith("│ ")]
    assert line_with(lines, "7 clears:").startswith("7 clears: 1 turn limit (turn 6)")


def test_usage_chart_resamples_long_replays() -> None:
    values = [(i % 50) * 1000 for i in range(1, 1001)]
    reasons: list[str | None] = [None] * 1000
    for i in range(48, 1000, 50):
        reasons[i] = "MemoryThreshold"
    reasons[149] = "ConversationLimit"
    lines = render.usage_chart(values, reasons, 100_000, 0.45, width=72).plain.splitlines()
    assert len(lines) == 8
    bars, marker = lines[0], lines[6]
    assert len(marker) == 72 and len(bars) == 72
    assert marker.startswith("         0 └")
    assert marker.count("M") + marker.count("*") == 20  # one clear every 50 turns, 60 columns
    assert "*" in marker  # the turn-limit clear shares a column with a memory clear
    assert lines[7].split()[:2] == ["1", "167"]


def test_spark_counts_and_bar() -> None:
    assert render.spark_counts([0, 1, 2, 8]) == "·▁▂█"
    assert render.spark_counts([0, 0]) == "··"
    assert render.usage_bar(0.25, 0.6, "below", width=10).plain == "███░░░┆░░░"
    assert render.usage_bar(0.9, 0.6, "over", width=10).plain == "█████████░"
    assert render.usage_bar(0.001, 0.6, "below", width=10).plain == "█░░░░░┆░░░"


# ----------------------------------------------------------------------------- the command
def run(*args: str) -> CliRun:
    """``kvcache ARGS`` in-process, in the test's kvcache home (output checked as JSON or
    error lines; the width-dependent tables are checked through the script below)."""
    return invoke(*args, home=Path(os.environ["KVCACHE_HOME"]), env={"COLUMNS": "100"})


@pytest.mark.slow
def test_stats_piped_is_plain_and_json_keeps_its_keys(known: dict[str, Any], tmp_path: Path) -> None:
    db = str(known["path"])
    for args in (("stats",), ("stats", "support-long")):
        piped = run_kvcache(*args, home=tmp_path, db=db, env={"COLUMNS": "100"}, timeout=60)
        assert piped.returncode == 0, piped.stderr
        text = piped.stdout
        assert "\x1b[" not in text
        assert "cache vs capacity" in text or "cache usage by turn" in text
    ran = run("--db", db, "stats", "--json")
    assert ran.returncode == 0, ran.stderr
    data = json.loads(ran.stdout)
    assert STATS_KEYS <= set(data)
    assert set(data) - STATS_KEYS == {"insights", "session_count"}
    assert {"sessions_by_fill", "top_by_size", "top_by_clears", "operations_per_hour", "maintenance"} <= set(
        data["insights"]
    )
    assert data["sessions"][0]["session_id"] == "billing"  # existing order (by key) unchanged
    detail = json.loads(run("--db", db, "stats", "support-long", "--json").stdout)
    assert {"snapshots", "summary", "usage", "message_count"} <= set(detail["session"])


def test_process_replay_prints_sawtooth_plain(tmp_path: Path) -> None:
    conv = support_conversation("chat", 20, seed=7, long_every=7)
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"session_id": "chat", "messages": [m.to_dict() for m in conv.messages]}))
    cfg = tmp_path / "kvcache.toml"
    cfg.write_text(
        "[cache]\nclear_after_conversations = 6\n"
        "[model]\nn_ctx = 1024\nlayers = 4\nkv_heads = 2\nhead_dim = 64\n"
    )
    proc = run("--db", str(tmp_path / "kv.db"), "--config", str(cfg), "process", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout
    lines = proc.stdout.splitlines()
    assert line_with(lines, "cache usage by turn:").endswith("T turn limit, M memory")
    marker = line_with(lines, "         0 └")
    assert "T" in marker and "M" in marker
    assert any(line.lstrip().startswith("1 ") and line.endswith("  turn") for line in lines)
    summary = line_with(lines, f"{marker.count('T') + marker.count('M')} clears:")
    assert "turn limit" in summary and "memory" in summary


def test_watch_refuses_without_a_terminal(known: dict[str, Any]) -> None:
    proc = run("--db", str(known["path"]), "stats", "--watch")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "kvcache: error: --watch needs a terminal on stdout; drop --watch to print once"
    )
    proc = run("--db", str(known["path"]), "stats", "--watch", "--json")
    assert proc.returncode == 2 and "--json" in proc.stderr
    for args in (["--watch", "2"], ["--watch=2"], ["--watch", "2", "s1"]):  # 2 is SECONDS, not SESSION
        proc = run("--db", str(known["path"]), "stats", *args)
        assert proc.returncode == 2 and "--watch needs a terminal" in proc.stderr, args
    proc = run("--db", str(known["path"]), "stats", "--watch", "0.1")
    assert proc.returncode == 2 and "0.2" in proc.stderr


def test_watch_seconds_rewrite() -> None:
    from kvcache_cli.cli.commands.stats import watch_seconds_args as _watch_seconds_args

    assert _watch_seconds_args(["--watch", "5", "s"]) == ["--watch", "--interval", "5", "s"]
    assert _watch_seconds_args(["--watch=0.5"]) == ["--watch", "--interval", "0.5"]
    assert _watch_seconds_args(["s", "--watch"]) == ["s", "--watch"]
    assert _watch_seconds_args(["--watch", "s1"]) == ["--watch", "s1"]
    assert _watch_seconds_args(["--", "--watch", "2"]) == ["--", "--watch", "2"]


@pytest.mark.parametrize("watch_args", [["--watch", "--interval", "0.2"], ["--watch", "0.2"]])
def test_watch_redraws_until_ctrl_c(known: dict[str, Any], watch_args: list[str]) -> None:
    """On a pseudo-terminal: draws, redraws, and stops with exit 0 on SIGINT."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*kvcache_command(), "--db", str(known["path"]), "stats", *watch_args],
        stdout=follower,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "100", "TERM": "xterm"},
    )
    os.close(follower)
    seen = b""
    try:
        while seen.count(b"watching every 0.2 s") < 2:
            chunk = os.read(leader, 65536)
            if not chunk:
                break
            seen += chunk
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    assert seen.count(b"watching every 0.2 s") >= 2
    assert b"\x1b[" in seen  # a terminal gets the live redraw
    assert proc.returncode == 0
    assert err.decode().strip().endswith("kvcache: stopped watching")


def test_printable_escapes_controls_and_bidi() -> None:
    assert render.printable("a\x00b\x1b[31mc\u202ed\te\nf\x85g\u2069\x7f") == (
        "a\\x00b\\x1b[31mc\\u202ed\te\nf\\x85g\\u2069\\x7f"
    )
    assert render.printable("plain ünïcode [bold]") == "plain ünïcode [bold]"


@pytest.mark.slow
def test_hostile_text_is_escaped_and_piped_tables_are_not_cut(tmp_path: Path) -> None:
    """Stored control/bidi characters print as escapes; piped output (no COLUMNS) keeps whole ids."""
    long_id = "3f2b8c1e-9a7d-4e5f-8b6a-1c2d3e4f5a6b-project"
    evil = "evil\x1b[31m\u202eid"
    convs = [
        {
            "session_id": sid,
            "messages": [
                {"role": "user", "content": "what is the budget\x00 for \x1b]0;pwn\x07 the \u202etrip [/x]"},
                {"role": "assistant", "content": "The budget is 4200 euros \x1b[2J for the trip :thumbs_up:"},
            ],
        }
        for sid in (long_id, evil)
    ]
    source = tmp_path / "c.json"
    source.write_text(json.dumps(convs), encoding="utf-8")
    db = str(tmp_path / "kv.db")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["KVCACHE_HOME"] = str(tmp_path)

    def piped(*args: str) -> str:
        command = [*kvcache_command(), "--db", db, *args]  # COLUMNS unset: the default width
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def here(*args: str) -> str:  # in-process: what it prints does not depend on the width
        ran = invoke("--db", db, *args, home=tmp_path)
        assert ran.returncode == 0, ran.stderr
        return ran.stdout

    here("process", str(source))
    here("snapshot", long_id)
    outputs = {
        "stats": piped("stats"),
        "stats evil": here("stats", evil),
        "retrieve": piped("retrieve", "--all-sessions", "budget trip"),
        "snapshots": piped("snapshot", "--list"),
    }
    for name, text in outputs.items():
        for raw in ("\x00", "\x1b", "\x07", "\u202e"):
            assert raw not in text, (name, raw)
    assert "\\x1b[31m\\u202eid" in outputs["stats"]
    # user text is printed as written: no :emoji: code replacement
    assert ":thumbs_up:" in outputs["retrieve"] and "\U0001f44d" not in outputs["retrieve"]
    assert "\\x00" in outputs["retrieve"] and "\\u202e" in outputs["retrieve"]
    for name in ("stats", "snapshots", "retrieve"):
        assert long_id in outputs[name], name
        assert "…" not in outputs[name], name
    proc = invoke("retrieve", "--all-sessions", "budget", "--json", home=tmp_path, db=db)
    assert "\\u0000" in proc.stdout  # --json stays exact
