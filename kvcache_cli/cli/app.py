"""The ``kvcache`` command line: parse, call the core, render. Nothing else lives here.

Errors are the core's own types; ``main`` turns each into one line on stderr and an
exit code (1 operational failure, 2 bad usage or input, 130 interrupted).
"""

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from kvcache_cli.errors import BadInputError, KVCacheError
from kvcache_cli.typer_speedups import install as _install_typer_speedups

_install_typer_speedups()  # plain parameters without importing pydantic (start-up time)

if TYPE_CHECKING:
    from kvcache_cli.config import Config
    from kvcache_cli.services.manager import KVCacheManager
    from kvcache_cli.store.backend import Store

app = typer.Typer(
    name="kvcache",
    help="Manage LLM conversation memory and KV cache: replay, clear, retrieve, snapshot, restore.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@dataclass
class AppState:
    """Global options, shared by every command."""

    db: str | None = None
    config_path: str | None = None
    verbose: int = 0
    quiet: bool = False
    _config: Any = None

    def config(self) -> "Config":
        if self._config is None:
            from kvcache_cli.config import load_config

            self._config = load_config(self.config_path)
        return self._config  # type: ignore[no-any-return]

    def db_url(self) -> str | None:
        """``--db``, then ``KVCACHE_DB``, then the config file, then the default path."""
        return self.db or os.environ.get("KVCACHE_DB") or self.config().database.url or None

    def open_store(self, read_only: bool = False) -> "Store":
        """The store; a read-only command on an explicit ``--db``/URL that names no
        existing database fails (a typo) instead of creating an empty one."""
        from kvcache_cli.store.backend import open_store

        url = self.db_url()
        return open_store(url, self.config().database.busy_timeout_ms, must_exist=read_only and bool(url))


STATE = AppState()


def _stderr(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")


def info(message: str) -> None:
    """A diagnostic on stderr (hidden by ``--quiet``)."""
    if not STATE.quiet:
        _stderr(message)


def debug(message: str) -> None:
    if STATE.verbose and not STATE.quiet:
        _stderr(message)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def show(result: Any, as_json: bool, draw: Any) -> None:
    """``--json``: the result's ``to_dict()``; otherwise the Rich rendering."""
    if as_json:
        emit_json(result.to_dict())
    else:
        draw(result)


def _llm_client(server: str | None, required: bool = False) -> Any:
    """The LLM client from ``--server`` or ``[llm]``; None when neither names a server."""
    cfg = STATE.config().llm
    base = server or cfg.base_url
    embeddings_only = not base and bool(cfg.embeddings_url)
    if embeddings_only and not required:
        base = cfg.embeddings_url
    if not base:
        if required:
            raise BadInputError("this needs an LLM server: pass --server URL or set [llm].base_url")
        return None
    from kvcache_cli.llm.client import LLMClient, LLMSettings

    settings = LLMSettings(
        base_url=base,
        embeddings_url=cfg.embeddings_url or None,
        api_key_env=cfg.api_key_env or None,
        model=cfg.model,
        embedding_model=cfg.embedding_model or None,
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        retries=cfg.retries,
        backoff=cfg.backoff,
        summary_max_tokens=cfg.summary_max_tokens,
        embedding_batch_size=cfg.embedding_batch_size,
    )
    client = LLMClient(settings)
    client.embeddings_only = embeddings_only  # type: ignore[attr-defined]
    return client


def _manager(
    server: str | None = None, need_server: bool = False, read_only: bool = False
) -> "tuple[KVCacheManager, Store]":
    """The manager and its store; ``read_only``: the command works on an existing store."""
    from kvcache_cli.services.manager import KVCacheManager

    config = STATE.config()
    llm = _llm_client(server, need_server)
    store = STATE.open_store(read_only)
    return KVCacheManager(store, config, llm), store


@app.callback()
def main_options(
    db: Annotated[
        Optional[str],
        typer.Option("--db", help="Database file or URL (overrides KVCACHE_DB and the config)."),
    ] = None,
    config: Annotated[
        Optional[str], typer.Option("--config", help="Config file (overrides KVCACHE_CONFIG).")
    ] = None,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More diagnostics on stderr.")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
) -> None:
    """Manage LLM conversation memory and KV cache."""
    STATE.db = db
    STATE.config_path = config
    STATE.verbose = verbose
    STATE.quiet = quiet
    STATE._config = None


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]
ServerOpt = Annotated[
    Optional[str], typer.Option("--server", help="LLM server base URL (overrides [llm].base_url).")
]
SlotOpt = Annotated[Optional[int], typer.Option("--slot", help="Also act on this llama-server slot.", min=0)]


@app.command()
def process(
    files: Annotated[list[Path], typer.Argument(help="Conversation files (JSON or JSON Lines).")],
    fmt: Annotated[str, typer.Option("--format", help="auto, native, openai, sharegpt or jsonl.")] = "auto",
    session: Annotated[
        Optional[str], typer.Option("--session", help="Session id for files that carry none.")
    ] = None,
    server: ServerOpt = None,
    slot: Annotated[
        Optional[int], typer.Option("--slot", help="Size the cache by this llama-server slot's n_ctx.", min=0)
    ] = None,
    as_json: JsonOpt = False,
    turns: Annotated[bool, typer.Option("--turns/--no-turns", help="Per-turn detail in --json.")] = False,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            min=0,
            help="Worker processes for conversations new to a SQLite store (0: one per CPU core; 1: none).",
        ),
    ] = 0,
) -> None:
    """Replay conversation files turn by turn: clears, snapshots, retrievals, bridges."""
    from kvcache_cli.cli import render
    from kvcache_cli.loaders import load_file

    manager, store = _manager(server, need_server=slot is not None)
    try:
        manager.use_server_context(slot)
    except BaseException:
        store.close()
        raise
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    interrupted = False

    def fail(exc: KVCacheError) -> None:
        failures.append(str(exc))
        _stderr(f"kvcache: error: {exc}")

    def loaded() -> Any:  # (path, conversations, session keys, load error) per file
        for path in files:
            try:
                conversations = load_file(path, fmt)
            except KVCacheError as exc:
                yield path, [], [], exc  # reported in file order, even when read ahead
                continue
            keys = [
                conv.session_key
                or session
                or (path.stem if len(conversations) == 1 else f"{path.stem}-{index + 1}")
                for index, conv in enumerate(conversations)
            ]
            yield path, conversations, keys, None

    def replay(path: Path, conversations: list[Any], keys: list[str], runner: Any) -> None:
        try:  # a file that rewrites a stored conversation is refused before any write
            for conv, key in zip(conversations, keys, strict=True):
                manager.check_prefix(key, conv.messages, conv.place.rstrip(": ") or str(path))
        except KVCacheError as exc:
            if exc.exit_code == 1:
                raise
            fail(exc)
            return
        for conv, key in zip(conversations, keys, strict=True):
            try:
                with render.turn_progress(key, enabled=not (STATE.quiet or as_json)) as on_turn:
                    result = runner.take(conv) if runner is not None else None
                    if result is None:  # not sent to a worker, or stored meanwhile by another run
                        result = manager.process_conversation(conv, key, on_turn=on_turn)
            except KVCacheError as exc:
                if exc.exit_code == 1:
                    raise
                fail(exc)
                continue
            for notice in result.notices:
                info(f"kvcache: {notice}")
            results.append(result.to_dict(with_turns=turns))
            if not as_json:
                render.process_result(result, STATE.config().cache.memory_threshold_percent)

    try:
        workers, budget = 0, 0
        if store.is_sqlite:
            from kvcache_cli.services import parallel_replay as par

            if par.remove_stale_scratch(store):
                debug("kvcache: removed scratch files of an interrupted parallel replay")
            workers = par.workers_for(manager, jobs)
            budget = par.READ_AHEAD_BYTES if workers else 0
        for batch in _read_ahead(loaded(), budget):
            runner = None
            try:
                if workers:
                    with par.sigint_held():  # a Ctrl-C waits until the runner is here to be closed
                        runner = _start_workers(manager, batch, workers)
                for path, conversations, keys, error in batch:
                    if error is not None:
                        fail(error)
                    else:
                        replay(path, conversations, keys, runner)
            finally:
                if runner is not None:
                    runner.close()
                    for notice in runner.notices:
                        info(f"kvcache: {notice}")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        store.close()
    if as_json:
        emit_json({"sessions": results, "failed": failures})
    if interrupted:
        _stderr("kvcache: interrupted; stopped cleanly at a turn boundary (replay again to finish)")
        raise typer.Exit(130)
    if failures:
        raise typer.Exit(2)


def _read_ahead(units: Any, budget: int) -> Any:
    """Loaded files in batches of about ``budget`` bytes on disk (one by one for 0)."""
    from kvcache_cli.services.parallel_replay import read_ahead

    def size(unit: Any) -> int:
        try:
            return os.path.getsize(unit[0])
        except OSError:
            return 0

    return read_ahead(units, size, budget)


def _start_workers(manager: "KVCacheManager", batch: list[Any], workers: int) -> Any:
    """Send a batch's conversations that may run on workers (``parallel_replay``) to them."""
    from kvcache_cli.services.parallel_replay import ReplayJob, start

    jobs = [
        ReplayJob(conv, key)
        for _, conversations, keys, _ in batch
        for conv, key in zip(conversations, keys, strict=True)
    ]
    try:
        runner = start(manager, jobs, workers)
    except OSError as exc:  # no scratch folder beside the database, no processes: one process
        debug(f"kvcache: replaying in one process: {exc}")
        return None
    if runner is not None:
        debug(f"kvcache: replaying {len(runner.jobs)} new conversations on {runner.workers} worker processes")
    return runner


@app.command("import")
def import_command(
    files: Annotated[list[Path], typer.Argument(help="Conversation files (JSON Lines streamed; JSON).")],
    fmt: Annotated[str, typer.Option("--format", help="auto, native, openai, sharegpt or jsonl.")] = "auto",
    session: Annotated[
        Optional[str], typer.Option("--session", help="Session id for files that carry none.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Bulk-import conversation files into the searchable history (no clears/snapshots)."""
    from kvcache_cli.services.importing import import_files

    store = STATE.open_store()
    try:
        result = import_files(store, files, fmt, session, on_error=lambda e: _stderr(f"kvcache: error: {e}"))
    finally:
        store.close()
    if as_json:
        emit_json(result.to_dict())
    else:
        for item in result.files:
            info(
                f"{item.path}: {item.messages_added} of {item.messages_total} messages added "
                f"({item.conversations} conversations, {item.sessions_created} new sessions)"
            )
    if result.failed:
        raise typer.Exit(2)


@app.command()
def clear(
    session: Annotated[str, typer.Argument(help="Session id.")],
    slot: SlotOpt = None,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Clear a session's cache now, keeping its important entries (reason Manual)."""
    from kvcache_cli.cli import render

    manager, store = _manager(server, need_server=slot is not None, read_only=True)
    try:
        erased = None
        if slot is not None:
            # erase first: a server that refuses (bad slot, no --slot-save-path) leaves
            # the store untouched, and an erased slot is what the clear is about anyway
            manager.active_entries(session)  # unknown session fails before any slot request
            erased = manager.llm.slot_erase(slot)  # checks the id against GET /slots
        result = manager.clear(session)
        result.slot_erased = erased
    finally:
        store.close()
    show(result, as_json, render.clear_result)


def _parse_tiers(text: str) -> tuple[int, ...]:
    try:
        tiers = tuple(sorted({int(t) for t in text.replace(" ", "").split(",") if t}))
    except ValueError:
        raise BadInputError(f"--tiers {text!r}: use numbers among 1,2,3, e.g. 1,3") from None
    if not tiers or any(t not in (1, 2, 3) for t in tiers):
        raise BadInputError(f"--tiers {text!r}: use numbers among 1,2,3, e.g. 1,3")
    return tiers


@app.command()
def retrieve(
    args: Annotated[list[str], typer.Argument(help="SESSION QUERY (or just QUERY with --all-sessions).")],
    limit: Annotated[int, typer.Option("--limit", "-n", help="Most results to return.", min=1)] = 10,
    tiers: Annotated[
        str, typer.Option("--tiers", help="Tiers to search: 1 cache, 2 snapshots, 3 history.")
    ] = "1,2,3",
    strategy: Annotated[
        Optional[str], typer.Option("--strategy", help="Override cache.retrieval_strategy.")
    ] = None,
    all_sessions: Annotated[
        bool, typer.Option("--all-sessions", help="Search every session's history.")
    ] = False,
    min_score: Annotated[
        float, typer.Option("--min-score", help="Drop results under this similarity.")
    ] = 0.0,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find past context for QUERY in the active cache, snapshots and full history."""
    from kvcache_cli.cli import render

    if all_sessions:
        if len(args) != 1:
            raise BadInputError("with --all-sessions give only QUERY")
        session, query = None, args[0]
    else:
        if len(args) != 2:
            raise BadInputError("give SESSION and QUERY (or --all-sessions QUERY)")
        session, query = args
    tier_set = _parse_tiers(tiers)
    if not 0.0 <= min_score <= 1.0:  # also refuses NaN
        raise BadInputError(f"--min-score must be between 0 and 1, not {min_score}")
    if strategy is not None:
        from kvcache_cli.config import RETRIEVAL_STRATEGIES

        if strategy not in RETRIEVAL_STRATEGIES:
            raise BadInputError(f"--strategy must be one of {', '.join(RETRIEVAL_STRATEGIES)}")
        STATE.config().cache.retrieval_strategy = strategy
    manager, store = _manager(server, read_only=True)
    try:
        result = manager.retrieve(session, query, tier_set, limit, min_score)
    finally:
        store.close()
    for notice in result.notices:
        info(f"kvcache: {notice}")
    show(result, as_json, render.retrieval_result)


@app.command()
def snapshot(
    session: Annotated[Optional[str], typer.Argument(help="Session id.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List snapshots (of SESSION, or all).")] = False,
    slot: SlotOpt = None,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Snapshot a session's active cache now, or list snapshots."""
    from kvcache_cli.cli import render

    if not list_ and session is None:
        raise BadInputError("give SESSION to snapshot, or --list")
    manager, store = _manager(server, need_server=slot is not None, read_only=True)
    try:
        if list_:
            items = manager.list_snapshots(session)
            if as_json:
                emit_json({"snapshots": [s.to_dict() for s in items]})
            else:
                render.snapshot_list(items)
            return
        assert session is not None
        manager.active_entries(session)  # unknown session fails before any slot request
        slot_result = None
        if slot is not None:
            name = manager.llm.make_slot_filename(session, "snapshot")
            slot_result = manager.llm.slot_save(slot, name)  # checks the id against GET /slots
        info_ = manager.snapshot(session, slot_result, slot_id=slot)
    finally:
        store.close()
    show(info_, as_json, render.snapshot_created)


@app.command()
def restore(
    session: Annotated[str, typer.Argument(help="Session id.")],
    snapshot_id: Annotated[int, typer.Argument(help="Snapshot id (see snapshot --list).")],
    slot: SlotOpt = None,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put a snapshot's entries back into the session's active cache."""
    from kvcache_cli.cli import render

    manager, store = _manager(server, need_server=slot is not None, read_only=True)
    try:
        snap = manager.get_snapshot(session, snapshot_id)
        restored_tokens = None
        if slot is not None:
            if not snap.slot_filename:
                raise BadInputError(f"snapshot {snapshot_id} has no slot file (take it with --slot)")
            restored_tokens = manager.llm.slot_restore(slot, snap.slot_filename).n_restored
        result = manager.restore(session, snapshot_id, restored_tokens)
    finally:
        store.close()
    show(result, as_json, render.restore_result)


@app.command()
def maintain(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go; change nothing.")] = False,
    inactive_hours: Annotated[
        Optional[float],
        typer.Option("--inactive-hours", help="Idle time before a session's cache is released."),
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Run an integrity check and report it.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Release idle sessions' caches, prune snapshots, trim history (quiet for cron)."""
    from kvcache_cli.cli import render
    from kvcache_cli.errors import LockBusyError

    manager, store = _manager(read_only=True)
    try:
        try:
            result = manager.maintain(dry_run=dry_run, inactive_hours=inactive_hours, check=check)
        except LockBusyError as exc:
            info(f"kvcache: {exc}; nothing done")
            if as_json:
                emit_json({"skipped": True, "reason": str(exc)})
            return
    finally:
        store.close()
    if as_json:
        emit_json(result.to_dict())
    else:
        render.maintenance_result(result, verbose=STATE.verbose > 0)
    if result.integrity is not None and result.integrity != "ok":
        raise typer.Exit(1)


_SECONDS_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)")


def _watch_seconds_args(args: list[str]) -> list[str]:
    """``--watch N`` / ``--watch=N`` -> ``--watch --interval N`` (optional-value option)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        if arg.startswith("--watch="):
            out.extend(["--watch", "--interval", arg.split("=", 1)[1]])
        elif arg == "--watch" and i + 1 < len(args) and _SECONDS_RE.fullmatch(args[i + 1]):
            out.extend(["--watch", "--interval", args[i + 1]])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


class _StatsCommand(typer.core.TyperCommand):
    """Lets ``--watch`` take an optional SECONDS value (Typer 0.29 ignores ``flag_value``)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _watch_seconds_args(args))


@app.command(cls=_StatsCommand)
def stats(
    session: Annotated[Optional[str], typer.Argument(help="Show one session in detail.")] = None,
    history: Annotated[
        int, typer.Option("--history", help="How many recent operations to show.", min=0)
    ] = 10,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="--watch [SECONDS]: redraw every SECONDS (default 2) until Ctrl-C (needs a terminal).",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", help="Seconds between redraws (same as --watch SECONDS).", min=0.2)
    ] = 2.0,
) -> None:
    """Cache fill per session, top sessions, operations per hour; or SESSION in detail.

    With SESSION: its state, snapshots, summary and cache usage turn by turn.
    --watch [SECONDS] redraws in place every SECONDS (default 2; --interval is an alias)
    until Ctrl-C; it needs a terminal on stdout (exit 2 otherwise) and does not combine
    with --json. A number right after --watch is SECONDS: put a numeric SESSION first.
    """
    from kvcache_cli.cli import render
    from kvcache_cli.services.insights import compute as compute_insights

    if watch:
        if as_json:
            raise BadInputError("--watch redraws tables; it does not combine with --json")
        if not sys.stdout.isatty():
            raise BadInputError("--watch needs a terminal on stdout; drop --watch to print once")

        def fetch() -> tuple[dict[str, Any], dict[str, Any]]:
            manager, store = _manager(read_only=True)
            try:
                return manager.statistics(session, history), compute_insights(store, STATE.config())
            finally:
                store.close()

        try:
            render.watch_statistics(fetch, interval)
        except KeyboardInterrupt:
            _stderr("kvcache: stopped watching")
        return
    manager, store = _manager(read_only=True)
    try:
        data = manager.statistics(session, history)
        data["insights"] = compute_insights(store, STATE.config())
    finally:
        store.close()
    client = _llm_client(server)
    if client is not None:
        import dataclasses

        from kvcache_cli.errors import ServerError

        try:
            data["slots"] = [dataclasses.asdict(s) for s in client.slots()]
        except ServerError as exc:
            if server:  # asked for explicitly: a failure is an error
                raise
            info(f"kvcache: slots: {exc}")
            data["slots_error"] = str(exc)
        finally:
            client.close()
    if as_json:
        emit_json(data)
    else:
        render.statistics(data, data["insights"])


@app.command("copy-store")
def copy_store_command(
    source: Annotated[str, typer.Argument(help="Store to copy from (file, sqlite:/// or postgresql://).")],
    dest: Annotated[str, typer.Argument(help="Store to copy into (created and migrated if needed).")],
    force: Annotated[bool, typer.Option("--force", help="Replace the rows of a non-empty destination.")] = (
        False
    ),
    as_json: JsonOpt = False,
) -> None:
    """Copy a whole store between SQLite and PostgreSQL, verified by row counts and hashes."""
    from kvcache_cli.services.copy_store import copy_store

    result = copy_store(source, dest, force=force)
    if as_json:
        emit_json(result.to_dict())
        return
    from rich.table import Table

    from kvcache_cli.cli import render

    table = Table(title=f"copied {result.source} -> {result.destination}")
    for name in ("table", "rows", "sha256", "match"):
        table.add_column(name, justify="right" if name == "rows" else "left")
    for item in result.tables:
        table.add_row(item.table, str(item.dest_rows), item.dest_sha256[:16], "yes" if item.match else "NO")
    render.console.print(table)
    render.console.print(f"{result.total_rows} rows copied and verified")


@app.command("init-config")
def init_config(
    path: Annotated[
        Optional[Path], typer.Argument(help="Where to write (default: the user config file).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a starter kvcache.toml with every key at its default."""
    from kvcache_cli.config import starter_toml
    from kvcache_cli.paths import default_config_path, ensure_private_dir

    target = path or default_config_path()
    if target.exists() and not force:
        raise BadInputError(f"{target}: already exists (use --force to overwrite)")
    ensure_private_dir(target.parent)
    fd = os.open(target, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(starter_toml())
    if as_json:
        emit_json({"path": str(target), "written": True})
    else:
        info(f"wrote {target}")


def main() -> None:
    """Console entry point: run the app, turning kvcache errors into one line and a code."""
    try:
        app()
    except KVCacheError as exc:
        _stderr(f"kvcache: error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _stderr("kvcache: interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as exc:  # a bug or an unexpected environment: one line, not a traceback
        if STATE.verbose:
            import traceback

            traceback.print_exc()
        kind = type(exc).__name__
        if kind in ("OperationalError", "DatabaseError", "IntegrityError", "InterfaceError"):
            _stderr(f"kvcache: error: database: {exc}")
        else:
            _stderr(f"kvcache: error: unexpected {kind}: {exc} (run with -v for details)")
        sys.exit(1)
