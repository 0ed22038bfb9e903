"""``kvcache clear``: clear a session's cache now."""

import typer

from kvcache_cli.cli.context import cli_context
from kvcache_cli.cli.options import JsonOpt, ServerOpt, SessionArg, SlotOpt


def clear(
    ctx: typer.Context,
    session: SessionArg,
    slot: SlotOpt = None,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Clear a session's cache now, keeping its important entries (reason Manual)."""
    from kvcache_cli.cli.output import emit_json
    from kvcache_cli.services.slot_ops import clear_session

    manager, store = cli_context(ctx).manager(server, need_server=slot is not None, read_only=True)
    try:
        result = clear_session(manager, session, slot)
    finally:
        store.close()
    if as_json:
        emit_json(result.to_dict())
    else:
        from kvcache_cli.cli import render  # Rich: only to draw, not for --json

        render.clear_result(result)
