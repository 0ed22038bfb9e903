"""``kvcache serve``: an OpenAI-compatible proxy that manages the model's context."""

from typing import Annotated, Optional

import typer

from kvcache_cli.cli.context import cli_context, error_line

INSTALL_HINT = (
    "kvcache: error: kvcache serve needs the serve extra: pip install 'kvcache-cli[serve]' "
    "(from a clone: pip install '.[serve]')"
)


def serve(
    ctx: typer.Context,
    upstream: Annotated[
        Optional[str],
        typer.Option(
            "--upstream", metavar="URL", help="The model server (llama-server), e.g. http://127.0.0.1:8080."
        ),
    ] = None,
    host: Annotated[
        Optional[str],
        typer.Option(
            "--host", metavar="HOST", help="Address to listen on.", show_default="127.0.0.1, or [serve] host"
        ),
    ] = None,
    port: Annotated[
        Optional[int],
        typer.Option(
            "--port",
            metavar="N",
            help="Port to listen on (0: any free).",
            show_default="8088, or [serve] port",
        ),
    ] = None,
    api_key_env: Annotated[
        Optional[str],
        typer.Option(
            "--api-key-env", metavar="NAME", help="Clients must send 'Authorization: Bearer $NAME'."
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow a non-loopback --host without --api-key-env.")
    ] = False,
    trace: Annotated[
        Optional[str],
        typer.Option("--trace", metavar="FILE", help="Append one JSON line per turn: what the model saw."),
    ] = None,
) -> None:
    """Serve the OpenAI chat API in front of a model server, managing each session's context.

    On stderr: one line saying where it listens and which upstream it manages (scripts
    wait for it), whether slot swapping is on, then one line per request. With -q: only
    the listening line and errors.
    """
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        error_line(INSTALL_HINT)
        raise typer.Exit(1) from None
    from kvcache_cli.errors import BadInputError
    from kvcache_cli.server.launch import ServeOptions, run

    state = cli_context(ctx)
    config = state.config()
    section = config.serve
    url = upstream or section.upstream or config.llm.base_url
    if not url:
        raise BadInputError(
            "kvcache serve needs --upstream URL (or [serve] upstream or [llm] base_url in the config)"
        )
    options = ServeOptions(
        upstream=url,
        host=host or section.host,
        port=port if port is not None else section.port,
        api_key_env=api_key_env or section.api_key_env or None,
        insecure=insecure,
        trace=trace,
        max_body_bytes=section.max_body_bytes,
        reply_reserve=section.reply_reserve,
        verbose=state.verbose,
        quiet=state.quiet,
    )
    raise typer.Exit(run(options, config, state.db_url()))
