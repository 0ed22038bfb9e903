"""``kvcache stats``: cache fill, top sessions, operations; one session in detail; --watch."""

import sys
from typing import Annotated, Any

import typer

from kvcache_cli.cli.command import KvcacheCommand, split_optional_values
from kvcache_cli.cli.context import cli_context, error_line
from kvcache_cli.cli.options import JsonOpt, OptionalSessionArg, ServerOpt
from kvcache_cli.errors import BadInputError


class StatsCommand(KvcacheCommand):
    """``--watch`` takes an optional SECONDS value, carried by ``--interval``."""

    optional_values = {"--watch": "--interval"}


def watch_seconds_args(args: list[str]) -> list[str]:
    """``--watch N`` / ``--watch=N`` -> ``--watch --interval N`` (what ``stats`` parses)."""
    return split_optional_values(args, StatsCommand.optional_values)


def stats(
    ctx: typer.Context,
    session: OptionalSessionArg = None,
    history: Annotated[
        int, typer.Option("--history", metavar="N", help="How many recent operations to show.", min=0)
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
        float,
        typer.Option(
            "--interval",
            metavar="SECONDS",
            help="Seconds between redraws (same as --watch SECONDS).",
            min=0.2,
        ),
    ] = 2.0,
) -> None:
    """Cache fill per session, top sessions, operations per hour; or SESSION in detail.

    With SESSION: its state, snapshots, summary and cache usage turn by turn.
    --watch [SECONDS] redraws in place every SECONDS (default 2; --interval is an alias)
    until Ctrl-C; it needs a terminal on stdout (exit 2 otherwise) and does not combine
    with --json. A number right after --watch is SECONDS: put a numeric SESSION first.
    """
    from kvcache_cli.services.stats_report import add_server_slots, store_report

    state = cli_context(ctx)
    if watch:
        if as_json:
            raise BadInputError("--watch redraws tables; it does not combine with --json")
        if not sys.stdout.isatty():
            raise BadInputError("--watch needs a terminal on stdout; drop --watch to print once")

        def fetch() -> tuple[dict[str, Any], dict[str, Any]]:
            store = state.open_store(read_only=True)
            try:
                data = store_report(store, state.config(), session, history)
            finally:
                store.close()
            return data, data.pop("insights")

        from kvcache_cli.cli import render

        try:
            render.watch_statistics(fetch, interval)
        except KeyboardInterrupt:
            error_line("kvcache: stopped watching")
        return
    store = state.open_store(read_only=True)
    try:
        data = store_report(store, state.config(), session, history)
    finally:
        store.close()
    server_error = add_server_slots(data, state.llm_client(server), configured_only=not server)
    if as_json:
        from kvcache_cli.cli.output import emit_json

        emit_json(data)
    else:
        from kvcache_cli.cli import render  # Rich: only for the tables, not for --json

        render.statistics(data, data["insights"])
    if server_error is not None:
        if server:  # asked for explicitly: the store's part is shown, and the run fails
            error_line(f"kvcache: error: {server_error}")
            raise typer.Exit(1)
        state.info(f"kvcache: slots: {server_error}")
