"""How a command becomes part of ``kvcache``: global options, errors, help text.

``register(app, func)`` adds a plain function as a command. Around it:

* the global options ``--db``, ``--config``, ``-v``, ``-q`` are accepted after the
  command name too (they update the run's :class:`CliContext`; later ones win);
* the core's errors become one line on stderr and an exit code (2 bad usage or input,
  1 operational failure, 130 interrupted) inside the app, so that
  ``typer.testing.CliRunner().invoke(app, ...)`` behaves exactly as the ``kvcache`` script;
* usage lines and argument help read ``FILES...`` and ``[SESSION]`` rather than Typer's
  ``{files}...`` and ``<list[str]>``.

Only public Typer/click API is used: function signatures, ``cls=`` with a
``TyperCommand`` subclass, and click's ``Command`` methods.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

from kvcache_cli.cli.context import CliContext, cli_context, error_line
from kvcache_cli.errors import KVCacheError

# ------------------------------------------------------------------ global options
DbOpt = Annotated[
    Optional[str],
    typer.Option(
        "--db", metavar="PATH|URL", help="Database file or URL (overrides KVCACHE_DB and the config)."
    ),
]
ConfigOpt = Annotated[
    Optional[str], typer.Option("--config", metavar="FILE", help="Config file (overrides KVCACHE_CONFIG).")
]
VerboseOpt = Annotated[
    int, typer.Option("--verbose", "-v", count=True, show_default=False, help="More diagnostics on stderr.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]

#: The global options as keyword parameters added to every command (names kept apart).
_GLOBAL_PARAMS = {
    "global_db_": DbOpt,
    "global_config_": ConfigOpt,
    "global_verbose_": VerboseOpt,
    "global_quiet_": QuietOpt,
}
_GLOBAL_DEFAULTS: dict[str, Any] = {
    "global_db_": None,
    "global_config_": None,
    "global_verbose_": 0,
    "global_quiet_": False,
}


# ------------------------------------------------------------------ errors at the edge
_DATABASE_ERRORS = ("OperationalError", "DatabaseError", "IntegrityError", "InterfaceError")


def run_guarded(state: CliContext, call: Callable[[], Any]) -> Any:
    """Run ``call``; a core error becomes one line on stderr and ``typer.Exit(code)``."""
    try:
        return call()
    except (typer.Exit, typer.Abort, typer.BadParameter, BrokenPipeError):
        raise
    except KVCacheError as exc:
        error_line(f"kvcache: error: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        error_line("kvcache: interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug or an unexpected environment: one line, not a traceback
        if type(exc).__module__.startswith("typer"):  # click's own usage errors and exits
            raise
        if state.verbose:
            import traceback

            traceback.print_exc()
        kind = type(exc).__name__
        if kind in _DATABASE_ERRORS:
            error_line(f"kvcache: error: database: {exc}")
        else:
            error_line(f"kvcache: error: unexpected {kind}: {exc} (run with -v for details)")
        raise typer.Exit(1) from None


def _context_param(signature: inspect.Signature) -> str:
    for param in signature.parameters.values():
        if param.annotation is typer.Context:
            return param.name
    raise TypeError("a kvcache command takes a `ctx: typer.Context` parameter")


def with_global_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` with the global options added to its parameters and errors turned into exit codes."""
    signature = inspect.signature(func, eval_str=True)
    ctx_name = _context_param(signature)
    extra = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=_GLOBAL_DEFAULTS[name], annotation=hint
        )
        for name, hint in _GLOBAL_PARAMS.items()
    ]
    params = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        else p
        for p in signature.parameters.values()
    ]

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        given = {name: kwargs.pop(name, _GLOBAL_DEFAULTS[name]) for name in _GLOBAL_PARAMS}
        state = cli_context(kwargs[ctx_name])
        state.add_options(
            given["global_db_"], given["global_config_"], given["global_verbose_"], given["global_quiet_"]
        )
        return run_guarded(state, lambda: func(**kwargs))

    command.__signature__ = signature.replace(parameters=[*params, *extra])  # type: ignore[attr-defined]
    command.__annotations__ = {
        **{p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty},
        **_GLOBAL_PARAMS,
    }
    return command


# ------------------------------------------------------------------ help and parsing
def _argument_name(param: Any) -> str:
    name = str(param.metavar or (param.name or "").upper())
    return name if param.nargs == 1 or name.endswith("...") else f"{name}..."


class KvcacheCommand(TyperCommand):
    """A Typer command whose usage and argument help show ``FILES...`` and ``[SESSION]``.

    ``optional_values`` maps an option that may take a value (``--watch [SECONDS]``) to
    the option that carries the value (``--interval``); see :func:`split_optional_values`.
    """

    optional_values: dict[str, str] = {}

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = _argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args: list[tuple[str, str]] = []
        opts: list[tuple[str, str]] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((_argument_name(param), record[1]))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if self.optional_values:
            args = split_optional_values(args, self.optional_values)
        return super().parse_args(ctx, args)


def split_optional_values(args: list[str], options: dict[str, str]) -> list[str]:
    """``--watch 5`` / ``--watch=5`` -> ``--watch --interval 5`` for ``{"--watch": "--interval"}``.

    A number right after the option is its value; anything else (or nothing) leaves the
    option a plain flag. Arguments after ``--`` are left alone.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        flag, eq, value = arg.partition("=")
        if flag in options and eq:
            out.extend([flag, options[flag], value])
        elif arg in options and i + 1 < len(args) and _is_number(args[i + 1]):
            out.extend([arg, options[arg], args[i + 1]])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


_SECONDS = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)")


def _is_number(text: str) -> bool:
    """A plain decimal number (``5``, ``0.5``, ``.5``): what an optional value may be."""
    return _SECONDS.fullmatch(text) is not None


def register(
    app: typer.Typer,
    func: Callable[..., Any],
    name: str | None = None,
    cls: type[KvcacheCommand] = KvcacheCommand,
) -> None:
    """Add ``func`` to ``app`` as the command ``name`` (default: the function's name)."""
    app.command(name, cls=cls)(with_global_options(func))
