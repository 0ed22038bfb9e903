"""``kvcache init-config``: write a starter ``kvcache.toml``."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcache_cli.cli.context import cli_context
from kvcache_cli.cli.options import JsonOpt


def init_config(
    ctx: typer.Context,
    path: Annotated[
        Optional[Path],
        typer.Argument(metavar="PATH", help="Where to write (default: the user config file)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a starter kvcache.toml with every key at its default."""
    from kvcache_cli.cli.output import emit_json
    from kvcache_cli.services.config_file import write_starter_config

    target = write_starter_config(path, force)
    if as_json:
        emit_json({"path": str(target), "written": True})
    else:
        cli_context(ctx).info(f"wrote {target}")
