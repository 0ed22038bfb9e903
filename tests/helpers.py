"""Shared helpers for the foundation tests: run the real CLI, build conversations, dump a store."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tests.pg import is_pg, pg_dump, pg_rows

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
START = datetime(2025, 1, 6, 9, 0, 0)

# Fields that depend on the wall clock or the file location, not on the replayed data.
WALL_CLOCK_KEYS = frozenset(
    {
        "last_operation",
        "last_activity",
        "created_at",
        "timestamp",
        "database",
        "database_size_bytes",
        "updated_at",
        "generated_at",
    }
)


def kvcache_command() -> list[str]:
    """The installed ``kvcache`` beside this interpreter, else ``python -m kvcache_cli``."""
    script = Path(sys.executable).parent / "kvcache"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "kvcache_cli"]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment whose kvcache files all live under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
    env["KVCACHE_HOME"] = str(home)
    env["COLUMNS"] = "200"
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def run_kvcache(
    *args: str | os.PathLike[str],
    home: Path,
    db: Path | str | None = None,
    env: dict[str, str] | None = None,
    module: bool = False,
    cwd: Path | None = None,
) -> tuple[int, str, str]:
    """Run the CLI in a subprocess with ``KVCACHE_HOME=home``; returns (rc, stdout, stderr)."""
    command = [sys.executable, "-m", "kvcache_cli"] if module else kvcache_command()
    if db is not None:
        command += ["--db", str(db)]
    command += [str(a) for a in args]
    proc = subprocess.run(
        command,
        env=cli_env(home, **(env or {})),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=str(cwd or home),
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def run_json(*args: str | os.PathLike[str], home: Path, db: Path | str | None = None) -> Any:
    """Run a ``--json`` command that must succeed; returns the parsed output."""
    rc, out, err = run_kvcache(*args, "--json", home=home, db=db)
    assert rc == 0, f"kvcache {args} failed ({rc}): {err}"
    return json.loads(out)


# ----------------------------------------------------------------------------- conversations
def short_turn(n: int) -> tuple[str, str]:
    """A short user/assistant exchange for turn ``n`` (no retrieval trigger words)."""
    return (
        f"Turn {n}: please note item {n} for the grocery list.",
        f"Noted item {n}. Anything else for the list today?",
    )


def long_turn(n: int) -> tuple[str, str]:
    """A long exchange (about 1,000 characters each side)."""
    body = " ".join(
        f"Paragraph {n}.{k} describes the storage layer, the replication lag and the backup window in detail."
        for k in range(10)
    )
    return (f"Question {n}. {body}", f"Answer {n}. {body}")


def conversation(
    turns: int,
    *,
    session_id: str | None = "conv",
    long: bool = False,
    system: str | None = "You are a helpful assistant.",
    timestamps: bool = True,
    spacing_seconds: int = 30,
) -> dict[str, Any]:
    """A native-form conversation of ``turns`` user/assistant pairs."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    for n in range(1, turns + 1):
        user, assistant = (long_turn if long else short_turn)(n)
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    if timestamps:
        for i, msg in enumerate(messages):
            msg["timestamp"] = (START + timedelta(seconds=i * spacing_seconds)).isoformat() + "Z"
    data: dict[str, Any] = {"messages": messages}
    if session_id is not None:
        data["session_id"] = session_id
    return data


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def truncated(data: dict[str, Any], message_count: int) -> dict[str, Any]:
    """A copy of a native conversation keeping its first ``message_count`` messages."""
    copy = dict(data)
    copy["messages"] = [dict(m) for m in data["messages"][:message_count]]
    return copy


# ----------------------------------------------------------------------------- store dumps
def dump_db(path: Path | str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows (sorted), read with plain ``sqlite3`` (or psycopg2 for a
    ``postgresql://`` URL): compare before/after."""
    if is_pg(path):
        return pg_dump(str(path))
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [
            r[0]
            for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            if not r[0].startswith("sqlite_")
        ]
        out: dict[str, list[tuple[Any, ...]]] = {}
        for name in names:
            try:
                rows = con.execute(f'SELECT * FROM "{name}"').fetchall()
            except sqlite3.DatabaseError:
                continue  # virtual tables of a module this sqlite3 cannot read
            out[name] = sorted(rows, key=repr)
        return out
    finally:
        con.close()


def table_rows(path: Path | str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (``?`` placeholders) on a SQLite file or a PostgreSQL URL."""
    if is_pg(path):
        return pg_rows(str(path), sql, params)
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def strip_wall_clock(value: Any) -> Any:
    """``value`` without the keys that depend on when or where it ran."""
    if isinstance(value, dict):
        return {k: strip_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK_KEYS}
    if isinstance(value, list):
        return [strip_wall_clock(v) for v in value]
    return value


def one_error_line(stderr: str) -> str:
    """Assert ``stderr`` is exactly one non-traceback line and return it."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got: {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]
