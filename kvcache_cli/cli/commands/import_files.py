"""``kvcache import``: bulk-import conversation files into the searchable history."""

from pathlib import Path
from typing import Annotated

import typer

from kvcache_cli.cli.context import cli_context, error_line
from kvcache_cli.cli.options import FormatOpt, JsonOpt, SessionOpt


def import_command(
    ctx: typer.Context,
    files: Annotated[
        list[Path], typer.Argument(metavar="FILES...", help="Conversation files (JSON Lines streamed; JSON).")
    ],
    fmt: FormatOpt = "auto",
    session: SessionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bulk-import conversation files into the searchable history (no clears/snapshots)."""
    from kvcache_cli.cli.output import emit_json
    from kvcache_cli.services.importing import import_files

    state = cli_context(ctx)
    store = state.open_store()
    try:
        result = import_files(
            store, files, fmt, session, on_error=lambda e: error_line(f"kvcache: error: {e}")
        )
    finally:
        store.close()
    if as_json:
        emit_json(result.to_dict())
    else:
        from kvcache_cli.cli import render  # Rich: only to draw, not for --json

        render.import_result(result)
    for item in result.files:
        if item.conversations == 0:
            from kvcache_cli.loaders import no_conversations_notice

            state.info(f"kvcache: {no_conversations_notice(item.path)}")
    if result.failed:
        raise typer.Exit(2)
