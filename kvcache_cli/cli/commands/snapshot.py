"""``kvcache snapshot``: snapshot a session's active cache, or list snapshots."""

from typing import Annotated

import typer

from kvcache_cli.cli.context import cli_context
from kvcache_cli.cli.options import JsonOpt, OptionalSessionArg, ServerOpt, SlotOpt
from kvcache_cli.errors import BadInputError


def snapshot(
    ctx: typer.Context,
    session: OptionalSessionArg = None,
    list_: Annotated[bool, typer.Option("--list", help="List snapshots (of SESSION, or all).")] = False,
    slot: SlotOpt = None,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Snapshot a session's active cache now, or list snapshots."""
    from kvcache_cli.cli.output import emit_json
    from kvcache_cli.services.slot_ops import take_snapshot

    if not list_ and session is None:
        raise BadInputError("give SESSION to snapshot, or --list")
    manager, store = cli_context(ctx).manager(server, need_server=slot is not None, read_only=True)
    try:
        if list_:
            items = manager.list_snapshots(session)
        else:
            assert session is not None
            created = take_snapshot(manager, session, slot)
    finally:
        store.close()
    if as_json:
        emit_json(created.to_dict() if not list_ else {"snapshots": [s.to_dict() for s in items]})
        return
    from kvcache_cli.cli import render  # Rich: only to draw, not for --json

    if not list_:
        render.snapshot_created(created)
    else:
        render.snapshot_list(items)
