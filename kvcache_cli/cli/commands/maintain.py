"""``kvcache maintain``: release idle caches, prune snapshots, trim history (for cron)."""

from typing import Annotated, Optional

import typer

from kvcache_cli.cli.context import cli_context
from kvcache_cli.cli.options import JsonOpt


def maintain(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go; change nothing.")] = False,
    inactive_hours: Annotated[
        Optional[float],
        typer.Option(
            "--inactive-hours", metavar="HOURS", help="Idle time before a session's cache is released."
        ),
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Run an integrity check and report it.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Release idle sessions' caches, prune snapshots, trim history (quiet for cron)."""
    from kvcache_cli.cli.output import emit_json
    from kvcache_cli.errors import LockBusyError
    from kvcache_cli.services.maintain import maintain as run_maintenance

    state = cli_context(ctx)
    config = state.config()
    store = state.open_store(read_only=True)
    try:
        try:
            result = run_maintenance(store, config, dry_run, inactive_hours, check)
        except LockBusyError as exc:
            state.info(f"kvcache: {exc}; nothing done")
            if as_json:
                emit_json({"skipped": True, "reason": str(exc)})
            return
    finally:
        store.close()
    if as_json:
        emit_json(result.to_dict())
    else:
        from kvcache_cli.cli import render  # Rich: only for the report, not for --json

        render.maintenance_result(result, verbose=state.verbose > 0)
    if result.integrity is not None and result.integrity != "ok":
        raise typer.Exit(1)
