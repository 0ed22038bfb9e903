"""``kvcache process``: replay conversation files turn by turn."""

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from kvcache_cli.cli.context import CliContext, cli_context, error_line
from kvcache_cli.cli.options import FormatOpt, JsonOpt, ServerOpt, SessionOpt

if TYPE_CHECKING:
    from kvcache_cli.errors import KVCacheError
    from kvcache_cli.services.replay import OnTurn, ReplayFailure
    from kvcache_cli.services.results import ProcessResult


class _Printer:
    """Shows a replay as it goes: a table per session, errors and notices on stderr."""

    def __init__(self, state: CliContext, as_json: bool) -> None:
        self.state = state
        self.as_json = as_json

    def progress(self, session_key: str) -> "AbstractContextManager[OnTurn | None]":
        if self.state.quiet or self.as_json:
            return nullcontext(None)
        from kvcache_cli.cli import render  # Rich: only to draw, not for --json

        return render.turn_progress(session_key, enabled=True)

    def session_done(self, result: "ProcessResult") -> None:
        if not self.as_json:
            from kvcache_cli.cli import render

            threshold = self.state.config().cache.memory_threshold_percent
            render.process_result(result, threshold, verbose=self.state.verbose > 0)

    def failed(self, failure: "ReplayFailure", exc: "KVCacheError") -> None:
        error_line(f"kvcache: error: {exc}")

    def notice(self, text: str) -> None:
        self.state.info(f"kvcache: {text}")

    def debug(self, text: str) -> None:
        self.state.debug(f"kvcache: {text}")


def process(
    ctx: typer.Context,
    files: Annotated[
        list[Path], typer.Argument(metavar="FILES...", help="Conversation files (JSON or JSON Lines).")
    ],
    fmt: FormatOpt = "auto",
    session: SessionOpt = None,
    server: ServerOpt = None,
    slot: Annotated[
        Optional[int],
        typer.Option("--slot", metavar="ID", help="Size the cache by this llama-server slot's n_ctx.", min=0),
    ] = None,
    as_json: JsonOpt = False,
    turns: Annotated[bool, typer.Option("--turns/--no-turns", help="Per-turn detail in --json.")] = False,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            metavar="N",
            min=0,
            help="Worker processes for conversations new to a SQLite store (0: one per CPU core; 1: none).",
        ),
    ] = 0,
) -> None:
    """Replay conversation files turn by turn: clears, snapshots, retrievals, bridges.

    With -v: each session's turns are listed with their cache use and clears.
    """
    from kvcache_cli.services.replay import replay_files

    state = cli_context(ctx)
    manager, store = state.manager(server, need_server=slot is not None)
    try:
        manager.use_server_context(slot)
        outcome = replay_files(manager, store, files, fmt, session, jobs, _Printer(state, as_json))
    finally:
        store.close()
    if as_json:
        from kvcache_cli.cli.output import emit_json

        emit_json(
            {
                "sessions": [r.to_dict(with_turns=turns) for r in outcome.results],
                "failed": [f.to_dict() for f in outcome.failures],
            }
        )
    if outcome.interrupted:
        error_line("kvcache: interrupted; stopped cleanly at a turn boundary (replay again to finish)")
        raise typer.Exit(130)
    if outcome.failures:
        raise typer.Exit(2)
