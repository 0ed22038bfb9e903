"""The ``kvcache`` app: global options, then one registered command per module.

Each command lives in ``cli/commands/<name>.py`` as a plain function (parse, call one
service, render); ``register`` adds the global options after the command name and turns
the core's errors into one line on stderr and an exit code (see ``cli/command.py``).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from kvcache_cli.cli.command import ConfigOpt, DbOpt, QuietOpt, VerboseOpt, register
from kvcache_cli.cli.commands.clear import clear
from kvcache_cli.cli.commands.copy_store import copy_store_command
from kvcache_cli.cli.commands.export import export_command
from kvcache_cli.cli.commands.forget import forget
from kvcache_cli.cli.commands.import_files import import_command
from kvcache_cli.cli.commands.init_config import init_config
from kvcache_cli.cli.commands.maintain import maintain
from kvcache_cli.cli.commands.process import process
from kvcache_cli.cli.commands.restore import restore
from kvcache_cli.cli.commands.retrieve import retrieve
from kvcache_cli.cli.commands.serve import serve
from kvcache_cli.cli.commands.sessions import sessions
from kvcache_cli.cli.commands.snapshot import snapshot
from kvcache_cli.cli.commands.stats import StatsCommand, stats
from kvcache_cli.cli.context import CliContext, error_line

app = typer.Typer(
    name="kvcache",
    help="Manage LLM conversation memory and KV cache: replay, import, clear, retrieve, snapshot, restore.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        from kvcache_cli import __version__

        sys.stdout.write(f"kvcache {__version__}\n")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    db: DbOpt = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
    version: Annotated[
        bool,
        typer.Option("--version", help="Show the version and exit.", callback=_show_version, is_eager=True),
    ] = False,
) -> None:
    """Manage LLM conversation memory and KV cache."""
    ctx.obj = CliContext(db=db, config_path=config, verbose=verbose, quiet=quiet)


register(app, process)
register(app, import_command, "import")
register(app, clear)
register(app, retrieve)
register(app, snapshot)
register(app, restore)
register(app, maintain)
register(app, stats, cls=StatsCommand)
register(app, sessions)
register(app, export_command, "export")
register(app, forget)
register(app, copy_store_command, "copy-store")
register(app, init_config, "init-config")
register(app, serve)


def main() -> None:
    """Console entry point. Commands report their own errors (``cli/command.py``); this
    only quiets a closed pipe and catches what escapes before a command runs."""
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)
    except KeyboardInterrupt:
        error_line("kvcache: interrupted")
        sys.exit(130)
