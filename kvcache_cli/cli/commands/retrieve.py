"""``kvcache retrieve``: find past context in the cache, snapshots and history."""

from typing import Annotated, Optional

import typer

from kvcache_cli.cli.context import cli_context
from kvcache_cli.cli.options import JsonOpt, ServerOpt, complete_first_session, complete_strategy
from kvcache_cli.errors import BadInputError


def parse_tiers(text: str) -> tuple[int, ...]:
    """``"1,3"`` -> ``(1, 3)``; anything but numbers among 1, 2, 3 is bad input."""
    try:
        tiers = tuple(sorted({int(t) for t in text.replace(" ", "").split(",") if t}))
    except ValueError:
        raise BadInputError(f"--tiers {text!r}: use numbers among 1,2,3, e.g. 1,3") from None
    if not tiers or any(t not in (1, 2, 3) for t in tiers):
        raise BadInputError(f"--tiers {text!r}: use numbers among 1,2,3, e.g. 1,3")
    return tiers


def retrieve(
    ctx: typer.Context,
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="[SESSION] QUERY",
            help="SESSION QUERY (or just QUERY with --all-sessions).",
            autocompletion=complete_first_session,
        ),
    ],
    limit: Annotated[
        int, typer.Option("--limit", "-n", metavar="N", help="Most results to return.", min=1)
    ] = 10,
    tiers: Annotated[
        str,
        typer.Option("--tiers", metavar="TIERS", help="Tiers to search: 1 cache, 2 snapshots, 3 history."),
    ] = "1,2,3",
    strategy: Annotated[
        Optional[str],
        typer.Option(
            "--strategy",
            metavar="STRATEGY",
            help="Override cache.retrieval_strategy (see kvcache.toml; TAB completes).",
            autocompletion=complete_strategy,
        ),
    ] = None,
    all_sessions: Annotated[
        bool, typer.Option("--all-sessions", help="Search every session's history.")
    ] = False,
    min_score: Annotated[
        float, typer.Option("--min-score", metavar="SCORE", help="Drop results under this similarity.")
    ] = 0.0,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find past context for QUERY in the active cache, snapshots and full history.

    With -v: each result's full text and how its score was made.
    """
    from kvcache_cli.cli.output import emit_json

    state = cli_context(ctx)
    if all_sessions:
        if len(args) != 1:
            raise BadInputError("with --all-sessions give only QUERY")
        session, query = None, args[0]
    else:
        if len(args) != 2:
            raise BadInputError("give SESSION and QUERY (or --all-sessions QUERY)")
        session, query = args
    tier_set = parse_tiers(tiers)
    if not 0.0 <= min_score <= 1.0:  # also refuses NaN
        raise BadInputError(f"--min-score must be between 0 and 1, not {min_score}")
    if strategy is not None:
        from kvcache_cli.config import RETRIEVAL_STRATEGIES

        if strategy not in RETRIEVAL_STRATEGIES:
            raise BadInputError(f"--strategy must be one of {', '.join(RETRIEVAL_STRATEGIES)}")
        state.config().cache.retrieval_strategy = strategy
    manager, store = state.manager(server, read_only=True)
    try:
        result = manager.retrieve(
            session, query, tier_set, limit, min_score, progress=lambda text: state.info(f"kvcache: {text}")
        )
    finally:
        store.close()
    for notice in result.notices:
        state.info(f"kvcache: {notice}")
    if as_json:
        emit_json(result.to_dict())
    else:
        from kvcache_cli.cli import render  # Rich: only to draw, not for --json

        render.retrieval_result(result, verbose=state.verbose > 0)
