"""The tests' one set of helpers: run kvcache, build conversations, read a store.

Running kvcache:

- ``invoke`` runs a command in this process with Typer's ``CliRunner``: the same exit
  code, stdout and stderr as the installed script, without an interpreter start-up. Use
  it wherever a process adds nothing.
- ``run_kvcache`` (to completion) and ``start_kvcache`` (in the background, in its own
  process group) run the installed ``kvcache`` script: for signals, crashes, concurrent
  writers, start-up behaviour (environment read at import) and the script itself.

Both give the run's files a private ``KVCACHE_HOME`` (``home``) and return a ``CliRun``
(``returncode``, ``stdout``, ``stderr``; it also unpacks as ``rc, out, err``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from kvcache_cli.config import Config
from kvcache_cli.engine.entries import ChatMessage
from kvcache_cli.loaders import Conversation
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


# ----------------------------------------------------------------------------- running kvcache
class CliRun(NamedTuple):
    """How a kvcache run ended (``rc, out, err = run`` unpacks it too)."""

    returncode: int
    stdout: str
    stderr: str


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment whose kvcache files all live under ``home`` (no KVCACHE_* of ours)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
    env["KVCACHE_HOME"] = str(home)
    env["COLUMNS"] = "200"
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def _argv(args: tuple[str | os.PathLike[str], ...], db: Path | str | None) -> list[str]:
    return (["--db", str(db)] if db is not None else []) + [os.fspath(a) for a in args]


def invoke(
    *args: str | os.PathLike[str],
    home: Path,
    db: Path | str | None = None,
    env: dict[str, str] | None = None,
    input: str | bytes | None = None,
    cwd: Path | None = None,
) -> CliRun:
    """Run ``kvcache ARGS`` in this process (``CliRunner``), in ``cwd`` (default ``home``).

    The environment is ``cli_env(home, **env)`` for the run's duration. A command that
    ends in an exception other than an exit is a bug: it is raised, with its traceback.
    """
    from typer.testing import CliRunner

    from kvcache_cli.cli.app import app

    home.mkdir(parents=True, exist_ok=True)
    environ: dict[str, str | None] = {k: None for k in os.environ if k.startswith("KVCACHE_")}
    environ.update(cli_env(home, **(env or {})))
    previous = os.getcwd()
    os.chdir(cwd or home)
    try:
        result = CliRunner().invoke(app, _argv(args, db), input=input, env=environ, prog_name="kvcache")
    finally:
        os.chdir(previous)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliRun(result.exit_code, result.stdout, result.stderr)


def invoke_json(*args: str | os.PathLike[str], home: Path, db: Path | str | None = None) -> Any:
    """Run a ``--json`` command in this process that must succeed; returns its output."""
    rc, out, err = invoke(*args, "--json", home=home, db=db)
    assert rc == 0, f"kvcache {args} failed ({rc}): {err}"
    return json.loads(out)


def kvcache_command() -> list[str]:
    """The installed ``kvcache`` beside this interpreter, else ``python -m kvcache_cli``."""
    script = Path(sys.executable).parent / "kvcache"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "kvcache_cli"]


def run_kvcache(
    *args: str | os.PathLike[str],
    home: Path,
    db: Path | str | None = None,
    env: dict[str, str] | None = None,
    module: bool = False,
    cwd: Path | None = None,
    timeout: float = 180,
) -> CliRun:
    """Run the installed ``kvcache ARGS`` (or ``python -m kvcache_cli``) in a subprocess."""
    home.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "kvcache_cli"] if module else kvcache_command()
    proc = subprocess.run(
        command + _argv(args, db),
        env=cli_env(home, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(cwd or home),
        check=False,
    )
    return CliRun(proc.returncode, proc.stdout, proc.stderr)


def start_kvcache(
    *args: str | os.PathLike[str], home: Path, db: Path | str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start the installed ``kvcache ARGS`` in the background, in a process group of its
    own (``stop_group`` ends it and its workers); stdout and stderr are pipes."""
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        kvcache_command() + _argv(args, db),
        env=cli_env(home, **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(home),
        start_new_session=True,
    )
    _started.append(proc)
    return proc


#: Runs ``start_kvcache`` began during the current test (``stop_leftovers`` ends them).
_started: list[subprocess.Popen[str]] = []


def stop_group(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc``'s process group (it and any workers it forked) and reap it: for a
    ``finally`` after a run that may have hung."""
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def stop_leftovers() -> int:
    """Kill the process groups of this test's ``start_kvcache`` runs that still live (a
    test that failed or timed out leaves nothing running); returns how many."""
    left = [proc for proc in _started if proc.poll() is None]
    for proc in left:
        stop_group(proc)
    _started.clear()
    return len(left)


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


def write_json(path: Path, data: Any, *, compact: bool = False) -> Path:
    """``data`` as JSON in ``path``: indented UTF-8, or ``compact`` (one line, non-ASCII
    escaped, so lone surrogates survive)."""
    text = json.dumps(data) if compact else json.dumps(data, indent=1, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    return path


def truncated(data: dict[str, Any], message_count: int) -> dict[str, Any]:
    """A copy of a native conversation keeping its first ``message_count`` messages."""
    copy = dict(data)
    copy["messages"] = [dict(m) for m in data["messages"][:message_count]]
    return copy


def recall_conversation(key: str, turns: int, topic: str) -> dict[str, Any]:
    """``conversation`` whose later questions recall earlier turns (retrievals fire)."""
    data = conversation(turns, session_id=key)
    for n, msg in enumerate(data["messages"]):
        if msg["role"] == "user" and n % 6 == 5:
            msg["content"] = f"Do you remember what we said about {topic} item {n // 3}?"
    return data


#: ``topic_cycle_conversation``'s topics, in turn.
CYCLE_TOPICS = [
    "rust borrow checker lifetimes",
    "sqlite write ahead log",
    "python asyncio event loop",
    "kv cache eviction policy",
    "docker bridge networking",
    "postgres vacuum tuning",
]


def topic_cycle_conversation(turns: int = 12, session: str = "s1") -> dict[str, Any]:
    """A native conversation cycling through ``CYCLE_TOPICS``; every third assistant reply is
    the same short text (the LLM-server tests' input)."""
    msgs = [{"role": "system", "content": "You are a helpful assistant for the kvcache project."}]
    for i in range(turns):
        topic = CYCLE_TOPICS[i % len(CYCLE_TOPICS)]
        msgs.append({"role": "user", "content": f"How does {topic} work in case {i}? Please explain."})
        reply = (
            "Sure." if i % 3 == 0 else f"The {topic} detail {i}: it keeps state and handles load carefully."
        )
        msgs.append({"role": "assistant", "content": reply})
    return {"session_id": session, "messages": msgs}


#: ``uniform_conversation``'s clock (Unix seconds).
BASE_TS = 1_700_000_000


def uniform_conversation(session: str, turns: int, topic: str = "cache", seed: int = 0) -> dict[str, Any]:
    """A native conversation of equal-length messages, timestamped (a replay is deterministic).

    Every message has exactly 12 words: tier-3 ranking normalises by the index's
    average message length over *all* sessions, so equal lengths keep one session's
    retrieval independent of what other sessions hold at the time (any interleaving of
    concurrent writers then gives the same numbers as a sequential run).
    """
    msgs: list[dict[str, Any]] = []
    for i in range(turns):
        t = BASE_TS + seed * 100_000 + i * 60
        question = f"how do i configure the {topic} option {i} for the {topic}{i % 7} setting?"
        if i % 5 == 0:
            question = f"remember the {topic} size {i} mb is important for the whole team"
        msgs.append({"role": "user", "content": question, "timestamp": t})
        msgs.append(
            {
                "role": "assistant",
                "content": f"set {topic}{i % 7} to {i * 3} and restart so the {topic} keeps {i} entries",
                "timestamp": t + 30,
            }
        )
    return {"session_id": session, "messages": msgs}


#: ``support_conversation``'s clock: every message is timestamped from here on.
T0 = datetime(2025, 3, 14, 9, 0, 0)
#: The "now" the rendering tests compute insights against.
NOW = datetime(2025, 3, 14, 15, 0, 0)

TOPICS = [
    "the nginx reverse proxy returns 502 after the upgrade",
    "postgres replication lag on the reporting replica",
    "a python script that rotates the api keys nightly",
    "the kubernetes pod keeps restarting with OOMKilled",
    "billing export to csv drops rows with unicode names",
    "redis eviction policy for the session cache",
]


def small_config(n_ctx: int = 1024, clear_after: int = 6) -> Config:
    """Small capacity so both memory and turn-limit clears happen in a short replay."""
    config = Config()
    config.model.n_ctx = n_ctx
    config.model.layers = 4
    config.model.kv_heads = 2
    config.model.head_dim = 64
    config.cache.clear_after_conversations = clear_after
    config.cache.retrieval_enabled = True
    return config


def support_conversation(
    key: str,
    turns: int,
    seed: int,
    start: datetime = T0,
    long_every: int = 0,
    size: int = 25,
    minutes: int = 10,
) -> Conversation:
    """A loaded support chat of ``turns`` random-topic pairs, deterministic for ``seed``;
    every ``long_every``-th turn is long and every fourth asks to recall."""
    rng = random.Random(seed)
    messages = [ChatMessage(role="system", content="You are a helpful support engineer.", timestamp=start)]
    for turn in range(turns):
        topic = TOPICS[rng.randrange(len(TOPICS))]
        n = size if not (long_every and turn % long_every == long_every - 1) else 10 * size
        words = " ".join(rng.choice(topic.split()) for _ in range(n))
        when = start + timedelta(minutes=minutes * turn + 1)
        ask = "Can you recall what we did" if turn % 4 == 3 else "Next"
        mark = "?" if turn % 4 == 3 else "."
        question = f"Turn {turn + 1}: {ask} about {topic}{mark} {words}"
        messages.append(ChatMessage(role="user", content=question, timestamp=when))
        answer = f"For {topic}: check the logs, then the config. " + " ".join(
            rng.choice(topic.split()) for _ in range(n // 2)
        )
        messages.append(ChatMessage(role="assistant", content=answer, timestamp=when + timedelta(seconds=30)))
    return Conversation(session_key=key, messages=messages, place=f"{key}: ")


def build_support_store(path: Path, config: Config | None = None) -> tuple[Any, list[Any]]:
    """Four support sessions of different shapes replayed into a fresh SQLite store (the
    rendering tests' known store); returns (store, results)."""
    from kvcache_cli.services.manager import KVCacheManager
    from kvcache_cli.store.backend import open_store

    config = config or small_config()
    store = open_store(str(path))
    manager = KVCacheManager(store, config)
    results = [
        manager.process_conversation(
            support_conversation("support-long", 30, seed=1, long_every=8), "support-long"
        ),
        manager.process_conversation(
            support_conversation("billing", 9, seed=2, start=T0 + timedelta(hours=1)), "billing"
        ),
        manager.process_conversation(
            support_conversation("quick", 2, seed=3, start=T0 + timedelta(hours=2), size=85), "quick"
        ),
        manager.process_conversation(
            support_conversation("upload", 1, seed=4, start=T0 + timedelta(hours=3), size=230), "upload"
        ),
    ]
    return store, results


# ----------------------------------------------------------------------------- store dumps
def copy_sqlite(source: Path | str, target: Path | str) -> None:
    """Copy the SQLite store at ``source`` to ``target`` (the backup API: a consistent copy)."""
    src = sqlite3.connect(source)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


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


def connect(db: Path) -> sqlite3.Connection:
    """A plain connection to a store file (no kvcache code involved)."""
    return sqlite3.connect(str(db), timeout=30)


SESSION_COLUMNS = (
    "key, conversation_count, turn_count, last_cleared_at, cache_size_bytes, capacity_bytes, "
    "entry_count, total_clears, metadata"
)


def _reader(db: Path | str) -> tuple[Callable[..., Any], Callable[[], None]]:
    """A ``q(sql, params) -> cursor-like`` for a SQLite file or a PostgreSQL URL, and a closer."""
    if is_pg(db):
        import psycopg2

        pg = psycopg2.connect(str(db))
        cur = pg.cursor()

        def q(sql: str, params: tuple[Any, ...] = ()) -> Any:
            sql = sql.replace("?", "%s").replace("round(g.score, 9)", "round(g.score::numeric, 9)")
            cur.execute(sql, params or None)
            return cur

        return q, pg.close
    conn = connect(Path(db))
    return conn.execute, conn.close


def logical_state(db: Path | str) -> dict[str, Any]:
    """Everything a replay decides, without wall-clock columns or row ids that may differ."""
    q, close = _reader(db)
    try:
        state: dict[str, Any] = {}
        state["sessions"] = q(f"SELECT {SESSION_COLUMNS} FROM sessions ORDER BY key").fetchall()
        state["messages"] = q(
            "SELECT s.key, m.message_index, m.role, m.name, m.content, m.tokens, m.timestamp "
            "FROM messages m JOIN sessions s ON s.id = m.session_id ORDER BY s.key, m.message_index"
        ).fetchall()
        state["cache"] = q(
            "SELECT s.key, c.key_hash, c.key_type, c.importance, c.access_count, c.size_bytes, c.tokens, "
            "c.message_index, c.position FROM cache_entries c JOIN sessions s ON s.id = c.session_id "
            "ORDER BY s.key, c.position, c.key_hash"
        ).fetchall()
        state["snapshots"] = q(
            "SELECT s.key, p.turn_index, p.snapshot_type, p.reason, p.state_hash, p.entry_count, p.size_bytes "  # noqa: E501
            "FROM snapshots p JOIN sessions s ON s.id = p.session_id ORDER BY s.key, p.turn_index, p.state_hash"  # noqa: E501
        ).fetchall()
        state["snapshot_entries"] = q(
            "SELECT p.state_hash, e.key_hash, e.position FROM snapshot_entries e "
            "JOIN snapshots p ON p.id = e.snapshot_id ORDER BY p.state_hash, e.position"
        ).fetchall()
        state["summaries"] = q(
            "SELECT s.key, u.text, u.messages_summarized, u.clear_count FROM summaries u "
            "JOIN sessions s ON s.id = u.session_id ORDER BY s.key"
        ).fetchall()
        state["turn_log"] = q(
            "SELECT s.key, t.turn_index, t.message_index, t.cache_size_bytes, t.entry_count, t.cleared, "
            "t.clear_reason, t.retrieved FROM turn_log t JOIN sessions s ON s.id = t.session_id "
            "ORDER BY s.key, t.turn_index"
        ).fetchall()
        state["engagement"] = q(
            "SELECT s.key, g.key_hash, round(g.score, 9) FROM engagement g JOIN sessions s ON s.id = g.session_id "  # noqa: E501
            "ORDER BY s.key, g.key_hash"
        ).fetchall()
        state["statistics"] = q(
            "SELECT total_clears, total_retrievals, total_snapshots, total_restores, entries_preserved, "
            "entries_cleared, entries_retrieved FROM statistics"
        ).fetchall()
        state["operations"] = q(
            "SELECT session_key, operation_type, entries_affected, count(*) FROM operations "
            "GROUP BY session_key, operation_type, entries_affected ORDER BY 1, 2, 3"
        ).fetchall()
        state["fts_rows"] = q("SELECT count(*) FROM messages").fetchone()
        return {k: [tuple(r) for r in v] if isinstance(v, list) else tuple(v) for k, v in state.items()}
    finally:
        close()


def committed_rows(db: Path, table: str) -> int:
    """Rows of ``table`` committed so far, read-only (0 while the store is being created)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def integrity(db: Path) -> str:
    conn = connect(db)
    try:
        return "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check").fetchall())
    finally:
        conn.close()


def check_turn_boundaries(db: Path | str, conversations: dict[str, dict[str, Any]]) -> None:
    """Assert that every session holds whole turns only and its records agree.

    ``conversations`` maps session key to the file's data. Stored messages must be a
    prefix of the file that ends at a turn boundary (the message before a user message
    or the end), and the turn count must equal the turn-log rows and user messages.
    """
    q, close = _reader(db)
    try:
        for key, data in conversations.items():
            row = q("SELECT id, turn_count FROM sessions WHERE key = ?", (key,)).fetchone()
            if row is None:
                continue
            sid, turn_count = row
            stored = q(
                "SELECT message_index, role, content FROM messages WHERE session_id = ? ORDER BY message_index",  # noqa: E501
                (sid,),
            ).fetchall()
            msgs = data["messages"]
            assert [r[0] for r in stored] == list(range(len(stored))), key
            for index, role, content in stored:
                assert (role, content) == (msgs[index]["role"], msgs[index]["content"]), (key, index)
            n = len(stored)
            assert n == len(msgs) or msgs[n]["role"] == "user", f"{key}: half a turn stored ({n} messages)"
            users = sum(1 for r in stored if r[1] == "user")
            logs = q("SELECT count(*) FROM turn_log WHERE session_id = ?", (sid,)).fetchone()[0]
            assert turn_count == users == logs, (key, turn_count, users, logs)
    finally:
        close()
