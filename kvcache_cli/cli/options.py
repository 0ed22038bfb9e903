"""Options and arguments several commands share, with their help and shell completion."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

FORMATS = ("auto", "native", "openai", "sharegpt", "jsonl")


def complete_format(incomplete: str) -> list[str]:
    """Values of ``--format``."""
    return [f for f in FORMATS if f.startswith(incomplete)]


def complete_strategy(incomplete: str) -> list[str]:
    """Values of ``--strategy`` (the config's list, so a new strategy shows up)."""
    from kvcache_cli.config import RETRIEVAL_STRATEGIES

    return [s for s in RETRIEVAL_STRATEGIES if s.startswith(incomplete)]


def complete_session(ctx: typer.Context, incomplete: str) -> list[str]:
    """Stored session ids starting with ``incomplete`` (none when the store cannot be read)."""
    from kvcache_cli.cli.context import CliContext

    db = config = None
    node: Any = ctx
    while node is not None:  # options after the command win over those before it
        db = db or node.params.get("global_db_") or node.params.get("db")
        config = config or node.params.get("global_config_") or node.params.get("config")
        node = node.parent
    try:
        from kvcache_cli.services.session_ids import session_ids

        store = CliContext(db=db, config_path=config).open_store(read_only=True)
        try:
            return session_ids(store, incomplete)
        finally:
            store.close()
    except Exception:  # completion must never print a traceback into the shell
        return []


def complete_first_session(ctx: typer.Context, incomplete: str) -> list[str]:
    """Session ids for the first word of ``SESSION QUERY`` (nothing for the query)."""
    if ctx.params.get("args") or ctx.params.get("all_sessions"):
        return []
    return complete_session(ctx, incomplete)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]
ServerOpt = Annotated[
    Optional[str],
    typer.Option("--server", metavar="URL", help="LLM server base URL (overrides [llm].base_url)."),
]
SlotOpt = Annotated[
    Optional[int], typer.Option("--slot", metavar="ID", help="Also act on this llama-server slot.", min=0)
]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        metavar="FORMAT",
        help="auto, native, openai, sharegpt or jsonl.",
        autocompletion=complete_format,
    ),
]
SessionOpt = Annotated[
    Optional[str],
    typer.Option("--session", metavar="SESSION", help="Session id for files that carry none."),
]
SessionArg = Annotated[
    str, typer.Argument(metavar="SESSION", help="Session id.", autocompletion=complete_session)
]
OptionalSessionArg = Annotated[
    Optional[str], typer.Argument(metavar="SESSION", help="Session id.", autocompletion=complete_session)
]
