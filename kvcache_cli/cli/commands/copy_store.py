"""``kvcache copy-store``: copy a whole store between SQLite and PostgreSQL."""

from typing import Annotated

import typer

from kvcache_cli.cli.options import JsonOpt


def copy_store_command(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Argument(metavar="SOURCE", help="Store to copy from (file, sqlite:/// or postgresql://).")
    ],
    dest: Annotated[
        str, typer.Argument(metavar="DEST", help="Store to copy into (created and migrated if needed).")
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Replace the rows of a non-empty destination.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy a whole store between SQLite and PostgreSQL, verified by row counts and hashes."""
    from kvcache_cli.cli.output import emit_json
    from kvcache_cli.services.copy_store import copy_store

    result = copy_store(source, dest, force=force)
    if as_json:
        emit_json(result.to_dict())
    else:
        from kvcache_cli.cli import render  # Rich: only to draw, not for --json

        render.copy_result(result)
