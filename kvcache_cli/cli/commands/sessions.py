"""``kvcache sessions``: list stored sessions."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kvcache_cli.cli.context import cli_context
from kvcache_cli.cli.options import JsonOpt


def sessions(
    ctx: typer.Context,
    idle_over: Annotated[
        Optional[float],
        typer.Option("--idle-over", metavar="HOURS", help="Only sessions idle for more than HOURS.", min=0),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List sessions: messages, turns, clears, cache used, last activity (UTC)."""
    from kvcache_cli.cli.output import emit_json
    from kvcache_cli.services.sessions import list_sessions

    store = cli_context(ctx).open_store(read_only=True)
    try:
        result = list_sessions(store, idle_over)
    finally:
        store.close()
    if as_json:
        emit_json(result.to_dict())
    else:
        from kvcache_cli.cli import render_sessions  # Rich: only to draw, not for --json

        render_sessions.session_list(result)
