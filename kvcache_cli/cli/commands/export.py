"""``kvcache export``: a stored conversation as a file ``process`` reads back."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvcache_cli.cli.context import cli_context
from kvcache_cli.cli.options import SessionArg


def complete_export_format(incomplete: str) -> list[str]:
    """Values of ``export --format``."""
    return [f for f in ("native", "openai") if f.startswith(incomplete)]


def export_command(
    ctx: typer.Context,
    session: SessionArg,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="FORMAT",
            help="native (session id, messages, timestamps) or openai (a bare messages list).",
            autocompletion=complete_export_format,
        ),
    ] = "native",
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", metavar="FILE", help="Write to FILE instead of standard output."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="With -o: print what was written as JSON (stdout is JSON anyway)."),
    ] = False,
) -> None:
    """Write a session's stored conversation as JSON (native or OpenAI messages).

    The file replays as it was: `kvcache export S -o s.json` then `kvcache process s.json`
    into another store stores the same messages.
    """
    from kvcache_cli.errors import BadInputError
    from kvcache_cli.services.sessions import export_session

    state = cli_context(ctx)
    store = state.open_store(read_only=True)
    try:
        data = export_session(store, session, fmt)
    finally:
        store.close()
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if output is None or str(output) == "-":
        sys.stdout.write(text)
        return
    try:  # owner-only, like the store: a conversation may be private
        fd = os.open(output, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise BadInputError(f"{output}: cannot write ({exc.strerror})") from None
    count = len(data if isinstance(data, list) else data["messages"])
    if as_json:
        from kvcache_cli.cli.output import emit_json

        emit_json({"session_id": session, "format": fmt, "path": str(output), "messages": count})
    else:
        state.info(f"wrote {count} messages of {session} to {output}")
