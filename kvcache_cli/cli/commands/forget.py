"""``kvcache forget``: delete sessions and everything they own."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from kvcache_cli.cli.context import cli_context
from kvcache_cli.cli.options import JsonOpt, complete_session


def forget(
    ctx: typer.Context,
    sessions: Annotated[
        list[str],
        typer.Argument(metavar="SESSION...", help="Sessions to forget.", autocompletion=complete_session),
    ],
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask; needed when not on a terminal.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would go; change nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete sessions: messages, cache, snapshots, summary, index, embeddings, history.

    All named sessions go in one transaction, or none (an unknown one is an error).
    Without --yes it asks on a terminal and refuses otherwise.
    """
    from kvcache_cli.cli.output import emit_json
    from kvcache_cli.errors import BadInputError
    from kvcache_cli.services import sessions as service

    state = cli_context(ctx)
    store = state.open_store(read_only=True)
    try:
        plan = service.plan_forget(store, sessions)  # unknown sessions fail before any question
        if dry_run:
            if as_json:
                emit_json(plan.to_dict())
            else:
                from kvcache_cli.cli import render_sessions  # Rich: only to draw, not for --json

                render_sessions.forget_result(plan)
            return
        if not yes:
            if not sys.stdin.isatty():
                raise BadInputError("forget deletes sessions for good: pass --yes (not on a terminal)")
            messages = sum(s.rows.get("messages", 0) for s in plan.sessions)
            names = ", ".join(s.session for s in plan.sessions)
            if not typer.confirm(f"Forget {names} ({messages} messages) for good?", err=True):
                state.info("kvcache: nothing forgotten")
                raise typer.Exit(1)
        result = service.forget_sessions(store, sessions, state.config().llm.slot_save_path)
    finally:
        store.close()
    for text in result.notices:
        state.info(f"kvcache: {text}")
    if as_json:
        emit_json(result.to_dict())
    else:
        from kvcache_cli.cli import render_sessions  # Rich: only to draw, not for --json

        render_sessions.forget_result(result)
