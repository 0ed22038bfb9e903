"""The ``kvcache`` app: global options, then one command per module, built when used.

Each command lives in ``cli/commands/<name>.py`` as a plain function (parse, call one
service, render); ``register`` adds the global options after the command name and turns
the core's errors into one line on stderr and an exit code (see ``cli/command.py``).

``COMMANDS`` names them; the group imports a command's module and builds its Typer
command only when that command runs (``--help`` and shell completion build them all),
so ``kvcache stats`` does not pay for the other thirteen (click's "lazily loading
subcommands" pattern, through a ``TyperGroup`` subclass).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, MutableMapping
from importlib import import_module
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from kvcache_cli.cli.command import ConfigOpt, DbOpt, KvcacheCommand, QuietOpt, VerboseOpt, register
from kvcache_cli.cli.context import CliContext, error_line

#: Command name -> (module in ``cli/commands``, its command function, its command class
#: when not ``KvcacheCommand``), in the order ``kvcache --help`` lists them.
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "process": ("process", "process", None),
    "import": ("import_files", "import_command", None),
    "clear": ("clear", "clear", None),
    "retrieve": ("retrieve", "retrieve", None),
    "snapshot": ("snapshot", "snapshot", None),
    "restore": ("restore", "restore", None),
    "maintain": ("maintain", "maintain", None),
    "stats": ("stats", "stats", "StatsCommand"),
    "sessions": ("sessions", "sessions", None),
    "export": ("export", "export_command", None),
    "forget": ("forget", "forget", None),
    "copy-store": ("copy_store", "copy_store_command", None),
    "init-config": ("init_config", "init_config", None),
    "serve": ("serve", "serve", None),
}


def build_command(name: str) -> Any:
    """The click command ``name`` of ``COMMANDS``, built as a one-command Typer app."""
    module_name, func_name, cls_name = COMMANDS[name]
    module = import_module(f"kvcache_cli.cli.commands.{module_name}")
    cls = getattr(module, cls_name) if cls_name else KvcacheCommand
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    register(single, getattr(module, func_name), name, cls=cls)
    return typer.main.get_command(single)


class _CommandsOnDemand(MutableMapping[str, Any]):
    """The group's commands by name (``COMMANDS`` order); each is built on first use."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            if name not in COMMANDS:
                raise KeyError(name)
            self._built[name] = build_command(name)
        return self._built[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        del self._built[name]

    def __iter__(self) -> Iterator[str]:
        yield from COMMANDS
        yield from (name for name in self._built if name not in COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS) + sum(1 for name in self._built if name not in COMMANDS)

    def __contains__(self, name: object) -> bool:
        return name in COMMANDS or name in self._built


class KvcacheGroup(TyperGroup):
    """The ``kvcache`` group: its commands are ``COMMANDS``, built when first used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _CommandsOnDemand()


app = typer.Typer(
    name="kvcache",
    cls=KvcacheGroup,
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
