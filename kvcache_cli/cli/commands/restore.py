"""``kvcache restore``: put a snapshot's entries back into a session's cache."""

from typing import Annotated

import typer

from kvcache_cli.cli.context import cli_context
from kvcache_cli.cli.options import JsonOpt, ServerOpt, SessionArg, SlotOpt


def restore(
    ctx: typer.Context,
    session: SessionArg,
    snapshot_id: Annotated[
        int, typer.Argument(metavar="SNAPSHOT", help="Snapshot id (see snapshot --list).")
    ],
    slot: SlotOpt = None,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put a snapshot's entries back into the session's active cache."""
    from kvcache_cli.cli.output import emit_json
    from kvcache_cli.services.slot_ops import restore_snapshot

    manager, store = cli_context(ctx).manager(server, need_server=slot is not None, read_only=True)
    try:
        result = restore_snapshot(manager, session, snapshot_id, slot)
    finally:
        store.close()
    if as_json:
        emit_json(result.to_dict())
    else:
        from kvcache_cli.cli import render  # Rich: only to draw, not for --json

        render.restore_result(result)
