"""``restore`` replaces the active cache and says so, with counts before and after
(issue 17, item 11)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from kvcache_cli.cli.app import app
from tests.helpers import EXAMPLES

SUPPORT = "support-4821"


def ok(*args: str | Path) -> Any:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    return result


def active(db: Path) -> int:
    [row] = json.loads(ok("--db", db, "sessions", "--json").stdout)["sessions"]
    return int(row["cache_entries"])


def test_restore_replaces_the_active_cache_and_says_so(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    ok("--db", db, "-q", "process", EXAMPLES / "support-chat.json")
    before = active(db)
    snaps = json.loads(ok("--db", db, "snapshot", "--list", SUPPORT, "--json").stdout)["snapshots"]
    small = min(snaps, key=lambda s: s["entry_count"])
    assert small["entry_count"] < before  # so a merge and a replace would differ
    data = json.loads(ok("--db", db, "restore", SUPPORT, str(small["id"]), "--json").stdout)
    assert data["mode"] == "replace"
    assert (data["entries_before"], data["entries_after"]) == (before, small["entry_count"])
    assert data["cache_bytes_after"] == small["size_bytes"] and data["cache_bytes_before"] > 0
    assert active(db) == small["entry_count"]  # replaced, not merged
    assert "expanded" not in data["bridge_message"] and "replaced" in data["bridge_message"]
    big = max(snaps, key=lambda s: s["entry_count"])
    text = ok("--db", db, "restore", SUPPORT, str(big["id"])).stdout
    assert f"restore replaced the active cache of session {SUPPORT} with snapshot {big['id']}" in text
    assert f"{small['entry_count']} entries" in text and f"{big['entry_count']} entries" in text
    assert "expanded" not in text
